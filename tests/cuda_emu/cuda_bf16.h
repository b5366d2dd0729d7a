// Emulation shim (tests/cuda_emu/emu_device.h).
#pragma once
#include "emu_device.h"
