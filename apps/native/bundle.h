// A bundle as a C++ host opens it: `manifest.json` read with a small JSON parser (no library),
// the current version's ExecuTorch program and weight file, the cache shape, the serving
// programs and the slot state, as the Python runtime derives them (`Runtime.cache_shape`,
// `Runtime.program`, `gate.slot_state`). Files are not checksummed here (the Python
// runtime verifies them on load).
#pragma once

#include <cctype>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace moegrow {

struct Json {
  enum Kind { kNull, kBool, kNumber, kString, kArray, kObject } kind = kNull;
  double number = 0;
  std::string string;
  std::vector<Json> array;
  std::map<std::string, Json> object;

  const Json& operator[](const std::string& key) const {
    static const Json null;
    auto it = object.find(key);
    return it == object.end() ? null : it->second;
  }
  bool has(const std::string& key) const { return object.count(key) > 0; }
  double num(double otherwise = 0) const { return kind == kNumber ? number : otherwise; }

  static Json parse(const std::string& text) {
    size_t pos = 0;
    Json v = value(text, pos);
    return v;
  }

 private:
  static void space(const std::string& s, size_t& p) {
    while (p < s.size() && std::isspace(static_cast<unsigned char>(s[p]))) ++p;
  }

  static Json value(const std::string& s, size_t& p) {
    space(s, p);
    if (p >= s.size()) throw std::runtime_error("manifest.json: unexpected end");
    Json v;
    const char c = s[p];
    if (c == '{') {
      v.kind = kObject;
      ++p;
      for (space(s, p); p < s.size() && s[p] != '}';) {
        std::string key = value(s, p).string;
        space(s, p);
        ++p;  // ':'
        v.object[key] = value(s, p);
        space(s, p);
        if (s[p] == ',') ++p, space(s, p);
      }
      ++p;
    } else if (c == '[') {
      v.kind = kArray;
      ++p;
      for (space(s, p); p < s.size() && s[p] != ']';) {
        v.array.push_back(value(s, p));
        space(s, p);
        if (s[p] == ',') ++p, space(s, p);
      }
      ++p;
    } else if (c == '"') {
      v.kind = kString;
      for (++p; p < s.size() && s[p] != '"'; ++p) {
        if (s[p] != '\\') {
          v.string += s[p];
          continue;
        }
        const char e = s[++p];
        if (e == 'u') {  // the manifest's strings are ASCII; \uXXXX kept as one '?'
          p += 4;
          v.string += '?';
        } else {
          v.string += e == 'n' ? '\n' : e == 't' ? '\t' : e;
        }
      }
      ++p;
    } else if (s.compare(p, 4, "true") == 0 || s.compare(p, 5, "false") == 0) {
      v.kind = kBool;
      v.number = s[p] == 't';
      p += s[p] == 't' ? 4 : 5;
    } else if (s.compare(p, 4, "null") == 0) {
      p += 4;
    } else {
      v.kind = kNumber;
      char* end = nullptr;
      v.number = std::strtod(s.c_str() + p, &end);
      p = size_t(end - s.c_str());
    }
    return v;
  }
};

struct Bundle {
  std::string dir, pte, ptd, tokenizer, prefill, decode;
  int layers = 0, kv_heads = 0, context = 0, head_dim = 0, slots = 0, version = 0;
  bool rows = false;  // the programs return their run's keys and values, not the whole cache
  std::vector<float> slot_state;  // [layers, 4, slots]

  // Throws std::runtime_error with a one-line reason.
  static Bundle open(const std::string& dir) {
    std::ifstream f(dir + "/manifest.json");
    if (!f) throw std::runtime_error(dir + ": no manifest.json (not a bundle)");
    std::stringstream text;
    text << f.rdbuf();
    const Json m = Json::parse(text.str());
    const Json& programs = m["programs"];
    if (!programs["prefill"].has("executorch"))
      throw std::runtime_error(dir + ": no executorch programs (export with --engines executorch)");
    if (!m["experts"].has("domains"))
      throw std::runtime_error(dir + ": exported before the domain gate: export it again");
    const Json& c = m["config"];
    Bundle b;
    b.dir = dir;
    b.pte = dir + "/" + programs["prefill"]["executorch"]["file"].string;
    b.ptd = dir + "/" + m["weights"]["files"]["executorch"]["file"].string;
    b.tokenizer = dir + "/" + m["tokenizer"]["file"].string;
    b.version = int(m["weights"]["version"].num());
    b.rows = m.has("cache") && m["cache"].string == "rows";
    b.layers = int(c["num_hidden_layers"].num());
    b.kv_heads = int(c["num_key_value_heads"].num());
    b.context = int(m["context"].num());
    b.head_dim = int(c["head_dim"].num(c["hidden_size"].num() / c["num_attention_heads"].num()));
    const double experts = c.has("num_local_experts") ? c["num_local_experts"].num()
                                                      : c["num_experts"].num();
    b.slots = int(experts + c["spare_experts"].num() + c["pool_experts"].num());
    b.slot_state.assign(size_t(b.layers) * 4 * b.slots, 0.f);
    auto at = [&](int layer, int row, int slot) -> float& {
      return b.slot_state[(size_t(layer) * 4 + row) * b.slots + slot];
    };
    bool spawned = false;
    for (const Json& r : m["experts"]["table"].array) {  // gate.slot_state
      const int layer = int(r["layer"].num()), slot = int(r["slot"].num());
      const std::string kind = r.has("kind") ? r["kind"].string : "base";
      if (kind == "spare" || kind == "pool") {
        at(layer, 2, slot) = 1.f;  // closed
      } else if (kind == "spawned") {
        spawned = true;
        at(layer, 0, slot) = float(r["bias"].num());
        at(layer, 1, slot) = 1.f;
        at(layer, 2, slot) = float(r["threshold"].num());
        at(layer, 3, slot) = float(r["class"].num());
      }
    }
    for (const Json& r : m["experts"]["table"].array) {  // a clone that replaces its parent
      if (r["replaces"].kind != Json::kBool || !r["replaces"].number) continue;
      const int layer = int(r["layer"].num()), parent = int(r["parent"].num());
      at(layer, 0, parent) = 0.f;  // gate.parent_row
      at(layer, 1, parent) = -1.f;
      at(layer, 2, parent) = -float(r["threshold"].num());
      at(layer, 3, parent) = float(r["class"].num());
    }
    const bool gated = spawned && programs.has("prefill_gated");  // Runtime.program
    b.prefill = gated ? "prefill_gated" : "prefill";
    b.decode = gated ? "decode_gated" : "decode";
    return b;
  }
};

}  // namespace moegrow
