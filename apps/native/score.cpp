// moegrow_score: a bundle's `score` program through the ExecuTorch C++ runtime.
//
//   moegrow_score MODEL.pte WEIGHTS.ptd TOKENS.bin SLOTS.bin LAYERS SLOTS OUT_DIR
//
// MODEL.pte is the bundle's program file, WEIGHTS.ptd the current version's weight file
// (manifest "weights"), TOKENS.bin the token ids (int64, BOS first), SLOTS.bin the slot
// state [LAYERS, 4, SLOTS] (float32; the Python runtime's `Runtime.slots`). Writes the
// program's outputs (per-token loss float32, rank int64) as OUT_DIR/out0.bin, out1.bin
// and prints the load and run times and the peak resident memory (VmHWM).
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "host.h"

using executorch::extension::make_tensor_ptr;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {

template <typename T>
std::vector<T> read_bin(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return {};
  const auto n = static_cast<size_t>(f.tellg());
  std::vector<T> v(n / sizeof(T));
  f.seekg(0);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s MODEL.pte WEIGHTS.ptd TOKENS.bin SLOTS.bin LAYERS SLOTS OUT_DIR\n",
                 argv[0]);
    return 2;
  }
  const std::string out_dir = argv[7];
  const auto tokens = read_bin<int64_t>(argv[3]);
  const auto slots = read_bin<float>(argv[4]);
  const int layers = std::atoi(argv[5]), width = std::atoi(argv[6]);
  if (tokens.empty() || slots.size() != static_cast<size_t>(layers) * 4 * width) {
    std::fprintf(stderr, "moegrow_score: %zu tokens, %zu slot values (want %d x 4 x %d)\n",
                 tokens.size(), slots.size(), layers, width);
    return 2;
  }
  executorch::runtime::runtime_init();
  const auto start = std::chrono::steady_clock::now();
  Module module(argv[1], argv[2], Module::LoadMode::Mmap);
  if (module.load_method("score") != Error::Ok) {
    std::fprintf(stderr, "moegrow_score: cannot load the score method of %s with %s\n", argv[1],
                 argv[2]);
    return 1;
  }
  std::printf("load %.1f ms\n", moegrow::ms_since(start));
  auto tok = make_tensor_ptr({1, static_cast<int>(tokens.size())}, std::vector<int64_t>(tokens));
  auto state = make_tensor_ptr({layers, 4, width}, std::vector<float>(slots));
  const auto run = std::chrono::steady_clock::now();
  auto result = module.execute("score", {EValue(tok), EValue(state)});
  if (!result.ok()) {
    std::fprintf(stderr, "moegrow_score: score failed (error 0x%x)\n",
                 static_cast<int>(result.error()));
    return 1;
  }
  std::printf("score %.3f ms\n", moegrow::ms_since(run));
  const auto& outputs = result.get();
  for (size_t i = 0; i < outputs.size(); ++i) {
    const auto& t = outputs[i].toTensor();
    std::ofstream f(out_dir + "/out" + std::to_string(i) + ".bin", std::ios::binary);
    f.write(static_cast<const char*>(t.const_data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  }
  std::printf("VmHWM %ld kB\n", moegrow::status_kb("VmHWM:"));
  return 0;
}
