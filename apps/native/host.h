// What both hosts measure: the process's memory (/proc/self/status) and elapsed time.
#pragma once

#include <chrono>
#include <cstring>
#include <fstream>
#include <string>

namespace moegrow {

inline long status_kb(const char* field) {  // "VmRSS:", "VmHWM:"
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(field, 0) == 0) return std::stol(line.substr(std::strlen(field)));
  return -1;
}

inline double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace moegrow
