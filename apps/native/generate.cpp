// moegrow_generate: a bundle's prefill and decode programs through the ExecuTorch C++ runtime,
// with the bundle's tokenizer in C++: suggestions for the next word and a greedy completion.
//
//   moegrow_generate BUNDLE PROMPT MAX_NEW [OUT_DIR]
//
// Opens BUNDLE as the Python runtime does (bundle.h: the manifest's current weights
// version, the serving programs, gated once an expert is spawned, and the slot state).
// Prints the bundle's version and programs, the prompt's token ids, three suggestions (the
// likeliest first pieces, each extended greedily to a word end), the greedy completion, the
// load / prefill / suggest / per-token decode times and the peak resident memory; with
// OUT_DIR, writes ids.bin (the prompt's ids, BOS first), logits.bin (the prefill's last
// logits), greedy.bin (the completion's ids) and text.txt (its text) there.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>
#include <executorch/runtime/platform/runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "bundle.h"
#include "host.h"
#include "tokenizer.h"

using executorch::extension::from_blob;
using executorch::extension::make_tensor_ptr;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::EValue;
using moegrow::ms_since;
using moegrow::status_kb;

namespace {

constexpr int kBos = 1, kEos = 2;

template <typename T>
void write_bin(const std::string& path, const std::vector<T>& v) {
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(T)));
}

std::vector<float> copy(const executorch::aten::Tensor& t) {
  const float* p = t.const_data_ptr<float>();
  return {p, p + t.numel()};
}

// The KV cache is read by the programs where it lies (from_blob: no copy), and they return
// the keys and values of the positions they ran, written into it in place (bundles with
// "cache": "rows"; before, the programs returned the whole new cache). Each suggestion's
// branch copies the prefill's step once, not each step.
struct Step {
  std::vector<float> logits, k, v;
};

class Model {
 public:
  Model(const char* pte, const char* ptd, std::vector<int> shape, std::vector<float> slots,
        std::string prefill, std::string decode, bool rows)
      : module_(pte, ptd, Module::LoadMode::Mmap), shape_(std::move(shape)),
        slots_(std::move(slots)), prefill_(std::move(prefill)), decode_(std::move(decode)),
        rows_(rows) {}

  bool load() {
    return module_.load_method(prefill_) == executorch::runtime::Error::Ok &&
           module_.load_method(decode_) == executorch::runtime::Error::Ok;
  }

  Step prefill(const std::vector<int64_t>& ids) {
    std::vector<int64_t> pos(ids.size());
    std::iota(pos.begin(), pos.end(), 0);
    std::vector<float> zero(cache_size(), 0.f);
    auto out = run(prefill_, {make_tensor_ptr({1, int(ids.size())}, std::vector<int64_t>(ids)),
                              make_tensor_ptr({int(ids.size())}, std::move(pos)), cache(zero),
                              cache(zero), slots()});
    novelty_ = copy(out[3].toTensor());
    novelty_shape_.assign(out[3].toTensor().sizes().begin(), out[3].toTensor().sizes().end());
    Step s{copy(out[0].toTensor()), std::move(zero), std::vector<float>(cache_size(), 0.f)};
    write(s.k, out[1].toTensor(), 0);
    write(s.v, out[2].toTensor(), 0);
    return s;
  }

  // one token at `pos`: `s` gets its logits and the token's keys and values
  void decode(int64_t token, int64_t pos, Step& s) {
    auto out = run(decode_, {make_tensor_ptr({1, 1}, std::vector<int64_t>{token}),
                             make_tensor_ptr({1}, std::vector<int64_t>{pos}), cache(s.k),
                             cache(s.v), slots(),
                             make_tensor_ptr(novelty_shape_, std::vector<float>(novelty_))});
    s.logits = copy(out[0].toTensor());
    write(s.k, out[1].toTensor(), pos);
    write(s.v, out[2].toTensor(), pos);
  }

  int context() const { return shape_[2]; }

 private:
  // a run's rows [L, 1, Hkv, T, D] written into `cache` from position `start` (or, from a
  // bundle before "cache": "rows", the whole cache the program returned)
  void write(std::vector<float>& cache, const executorch::aten::Tensor& out,
             int64_t start) const {
    const float* rows = out.const_data_ptr<float>();
    if (!rows_) {
      std::copy(rows, rows + out.numel(), cache.begin());
      return;
    }
    const size_t t = size_t(out.size(3)), s = size_t(shape_[2]), d = size_t(shape_[3]);
    for (size_t lh = 0; lh < size_t(shape_[0]) * shape_[1]; ++lh)
      std::copy(rows + lh * t * d, rows + (lh + 1) * t * d,
                cache.begin() + (lh * s + size_t(start)) * d);
  }

  size_t cache_size() const { return size_t(shape_[0]) * shape_[1] * shape_[2] * shape_[3]; }

  TensorPtr cache(std::vector<float>& data) const {  // read where it lies
    return from_blob(data.data(), {shape_[0], 1, shape_[1], shape_[2], shape_[3]});
  }

  TensorPtr slots() const {
    return make_tensor_ptr({shape_[0], 4, shape_[4]}, std::vector<float>(slots_));
  }

  std::vector<EValue> run(const std::string& method, const std::vector<TensorPtr>& in) {
    std::vector<EValue> args(in.begin(), in.end());
    auto result = module_.execute(method, args);
    if (!result.ok()) {
      std::fprintf(stderr, "moegrow_generate: %s failed (error 0x%x)\n", method.c_str(),
                   int(result.error()));
      std::exit(1);
    }
    return result.get();
  }

  Module module_;
  std::vector<int> shape_;
  std::vector<float> slots_, novelty_;
  std::vector<executorch::aten::SizesType> novelty_shape_;
  std::string prefill_, decode_;
  bool rows_;
};

int argmax(const std::vector<float>& x) {
  return int(std::max_element(x.begin(), x.end()) - x.begin());
}

std::vector<float> softmax(std::vector<float> z) {
  const float top = *std::max_element(z.begin(), z.end());
  double sum = 0;
  for (auto& x : z) sum += (x = std::exp(x - top));
  for (auto& x : z) x = float(x / sum);
  return z;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::fprintf(stderr, "usage: %s BUNDLE PROMPT MAX_NEW [OUT_DIR]\n", argv[0]);
    return 2;
  }
  const std::string prompt = argv[2], out_dir = argc == 5 ? argv[4] : "";
  const int max_new = std::atoi(argv[3]);
  moegrow::Bundle bundle;
  try {
    bundle = moegrow::Bundle::open(argv[1]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moegrow_generate: %s\n", e.what());
    return 2;
  }
  moegrow::Tokenizer tok;
  if (!tok.load(bundle.tokenizer)) {
    std::fprintf(stderr, "moegrow_generate: %s: not a SentencePiece model\n",
                 bundle.tokenizer.c_str());
    return 2;
  }
  std::printf("bundle v%d %s,%s\n", bundle.version, bundle.prefill.c_str(), bundle.decode.c_str());
  executorch::runtime::runtime_init();
  // one packed copy of each weight for all methods (XNNPACK's weight cache), not one per method
  executorch::runtime::BackendOptions<1> xnnpack;
  xnnpack.set_option("weight_cache_enabled", true);
  const bool cache = executorch::runtime::set_option("XnnpackBackend", xnnpack.view()) ==
                     executorch::runtime::Error::Ok;
  std::printf("xnnpack weight cache %s\n", cache ? "on" : "off");
  const long rss_before = status_kb("VmRSS:");  // the process and the engine's libraries
  auto start = std::chrono::steady_clock::now();
  Model model(bundle.pte.c_str(), bundle.ptd.c_str(),
              {bundle.layers, bundle.kv_heads, bundle.context, bundle.head_dim, bundle.slots},
              bundle.slot_state, bundle.prefill, bundle.decode, bundle.rows);
  if (!model.load()) {
    std::fprintf(stderr, "moegrow_generate: cannot load %s with %s\n", bundle.pte.c_str(),
                 bundle.ptd.c_str());
    return 1;
  }
  std::printf("load %.1f ms\n", ms_since(start));

  std::vector<int64_t> ids{kBos};
  for (int id : tok.encode(prompt)) ids.push_back(id);
  if (int(ids.size()) + std::max(max_new, 6) > model.context()) {
    std::fprintf(stderr, "moegrow_generate: the prompt is %zu tokens; the context is %d\n",
                 ids.size(), model.context());
    return 2;
  }
  std::printf("ids");
  for (auto id : ids) std::printf(" %lld", static_cast<long long>(id));
  std::printf("\n");
  start = std::chrono::steady_clock::now();
  const Step first = model.prefill(ids);
  std::printf("prefill %.2f ms (%zu tokens)\n", ms_since(start), ids.size());
  if (!out_dir.empty()) {
    write_bin(out_dir + "/ids.bin", ids);
    write_bin(out_dir + "/logits.bin", first.logits);
  }

  // suggestions: the three likeliest first pieces, each extended greedily to a word end
  std::vector<float> probs = softmax(first.logits);
  probs[kBos] = probs[kEos] = 0;
  std::vector<int> order(probs.size());
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + 3, order.end(),
                    [&](int a, int b) { return probs[a] > probs[b]; });
  start = std::chrono::steady_clock::now();
  std::string shown;
  for (int r = 0; r < 3; ++r) {
    std::vector<int> word{order[r]};
    Step s = first;
    for (int64_t pos = int64_t(ids.size()); pos < int64_t(ids.size()) + 5; ++pos) {
      model.decode(word.back(), pos, s);
      const int next = argmax(s.logits);
      const std::string& piece = tok.piece(next);
      if (next == kBos || next == kEos || piece.rfind("\xE2\x96\x81", 0) == 0 ||
          piece == "<0x0A>")
        break;
      word.push_back(next);
    }
    std::string w = tok.decode(word);
    w.erase(0, w.find_first_not_of(" \n"));
    w.erase(w.find_last_not_of(" \n") + 1);
    shown += (r ? " | " : " ") + w + " " + std::to_string(probs[order[r]]);
  }
  std::printf("suggest %.2f ms (after the prefill)\nsuggestions%s\n", ms_since(start),
              shown.c_str());

  // the greedy completion
  std::vector<int> greedy;
  Step s = first;
  start = std::chrono::steady_clock::now();
  for (int64_t pos = int64_t(ids.size()); int(greedy.size()) < max_new; ++pos) {
    const int next = argmax(s.logits);
    if (next == kEos) break;
    greedy.push_back(next);
    model.decode(next, pos, s);
  }
  const double per_token = greedy.empty() ? 0 : ms_since(start) / greedy.size();
  std::vector<int> all(ids.begin() + 1, ids.end());
  const std::string head = tok.decode(all);
  all.insert(all.end(), greedy.begin(), greedy.end());
  std::printf("decode %.2f ms/token\n", per_token);
  const std::string text = tok.decode(all).substr(head.size());
  std::printf("text %s\n", text.c_str());
  if (!out_dir.empty()) {
    std::ofstream(out_dir + "/text.txt", std::ios::binary) << text;
    write_bin(out_dir + "/greedy.bin", std::vector<int64_t>(greedy.begin(), greedy.end()));
  }
  std::printf("VmRSS %ld kB (before the load %ld kB)\n", status_kb("VmRSS:"), rss_before);
  std::printf("VmHWM %ld kB\n", status_kb("VmHWM:"));
  return 0;
}
