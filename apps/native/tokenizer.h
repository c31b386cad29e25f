// The bundle's SentencePiece tokenizer (`tokenizer.model`, BPE with byte fallback, identity
// normalization: export/tokenizer.py) in C++, without the sentencepiece library: the model
// file is read as the protobuf it is (pieces, scores, types), text is encoded as
// SentencePiece's BPE does (a "▁" before the text and for every space, characters merged
// pair by pair, the best-scored merge first, leftmost on ties; a character outside the
// vocabulary as its UTF-8 bytes <0xNN>) and ids are decoded back.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace moegrow {

class Tokenizer {
 public:
  enum Type { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

  // Returns false when the file is missing or not a SentencePiece model.
  bool load(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream buf;
    buf << f.rdbuf();
    const std::string data = buf.str();
    size_t pos = 0;
    while (pos < data.size()) {
      uint64_t key = varint(data, pos), length = 0;
      switch (key & 7) {
        case 0: varint(data, pos); break;
        case 1: pos += 8; break;
        case 5: pos += 4; break;
        case 2:
          length = varint(data, pos);
          if ((key >> 3) == 1) piece(data.substr(pos, length));  // ModelProto.pieces
          pos += length;
          break;
        default: return false;
      }
    }
    for (size_t id = 0; id < pieces_.size(); ++id) {
      if (types_[id] == kNormal || types_[id] == kUserDefined) ids_[pieces_[id]] = int(id);
      if (types_[id] == kByte) bytes_[std::stoi(pieces_[id].substr(3, 2), nullptr, 16)] = int(id);
      if (types_[id] == kUnknown) unk_ = int(id);
    }
    return !pieces_.empty();
  }

  std::vector<int> encode(const std::string& text) const {
    std::string s = kSpace;  // the dummy prefix
    for (char c : text) s += c == ' ' ? kSpace : std::string(1, c);
    std::vector<std::string> sym;  // characters, then merged pieces
    for (size_t i = 0; i < s.size();) {
      size_t n = utf8_length(static_cast<unsigned char>(s[i]));
      sym.push_back(s.substr(i, n));
      i += n;
    }
    // the best adjacent merge (score, then leftmost) until none is in the vocabulary
    while (true) {
      int best = -1;
      float best_score = 0;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = ids_.find(sym[i] + sym[i + 1]);
        if (it == ids_.end()) continue;
        if (best < 0 || scores_[it->second] > best_score) best = int(i), best_score = scores_[it->second];
      }
      if (best < 0) break;
      sym[best] += sym[best + 1];
      sym.erase(sym.begin() + best + 1);
    }
    std::vector<int> out;
    for (const auto& p : sym) {
      auto it = ids_.find(p);
      if (it != ids_.end()) {
        out.push_back(it->second);
        continue;
      }
      for (unsigned char b : p) out.push_back(bytes_.count(b) ? bytes_.at(b) : unk_);
    }
    return out;
  }

  std::string decode(const std::vector<int>& ids) const {
    std::string out;
    for (int id : ids) {
      if (id < 0 || id >= int(pieces_.size())) continue;
      if (types_[id] == kByte) out += char(std::stoi(pieces_[id].substr(3, 2), nullptr, 16));
      else if (types_[id] == kNormal || types_[id] == kUserDefined) out += pieces_[id];
      else if (types_[id] == kUnknown) out += " \xE2\x81\x87 ";  // SentencePiece's ⁇
    }
    std::string text;  // "▁" back to spaces, the dummy prefix's space dropped
    for (size_t i = 0; i < out.size();) {
      if (out.compare(i, kSpace.size(), kSpace) == 0) {
        text += ' ';
        i += kSpace.size();
      } else {
        text += out[i++];
      }
    }
    return !text.empty() && text[0] == ' ' ? text.substr(1) : text;
  }

  const std::string& piece(int id) const { return pieces_.at(id); }
  int size() const { return int(pieces_.size()); }

 private:
  static inline const std::string kSpace = "\xE2\x96\x81";  // U+2581 "▁"

  static uint64_t varint(const std::string& d, size_t& pos) {
    uint64_t v = 0;
    for (int shift = 0; pos < d.size(); shift += 7) {
      const auto b = static_cast<unsigned char>(d[pos++]);
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) break;
    }
    return v;
  }

  static size_t utf8_length(unsigned char c) {
    return c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
  }

  void piece(const std::string& m) {  // SentencePiece {1: piece, 2: score, 3: type}
    std::string text;
    float score = 0;
    int type = kNormal;
    for (size_t pos = 0; pos < m.size();) {
      uint64_t key = varint(m, pos);
      if ((key & 7) == 2) {
        uint64_t n = varint(m, pos);
        if ((key >> 3) == 1) text = m.substr(pos, n);
        pos += n;
      } else if ((key & 7) == 5) {
        if ((key >> 3) == 2) std::memcpy(&score, m.data() + pos, 4);
        pos += 4;
      } else if ((key & 7) == 0) {
        uint64_t v = varint(m, pos);
        if ((key >> 3) == 3) type = int(v);
      } else {
        pos += 8;
      }
    }
    pieces_.push_back(text);
    scores_.push_back(score);
    types_.push_back(type);
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<int> types_;
  std::unordered_map<std::string, int> ids_;
  std::map<int, int> bytes_;
  int unk_ = 0;
};

}  // namespace moegrow
