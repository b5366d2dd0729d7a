// C entry points of the emulator itself for tests/test_cuda_emu.py (ctypes), linked into each
// emulated kernel library (softmax_api.cpp, binary_api.cpp): the "device"'s SM count and the
// launches recorded since the last clear.
#include <stdint.h>

#include "emu_device.h"

extern "C" {

void emu_set_sms(int n) { emu_num_sms = n; }

void emu_clear_launches() { emu::launches.clear(); }

// Writes up to `max` launches as (grid, block.x, block.y) triples; returns how many there were.
int emu_launches(int64_t* out, int max) {
  const int n = static_cast<int>(emu::launches.size());
  for (int i = 0; i < n && i < max; ++i) {
    out[3 * i] = emu::launches[i].grid, out[3 * i + 1] = emu::launches[i].block_x, out[3 * i + 2] = emu::launches[i].block_y;
  }
  return n;
}

}  // extern "C"
