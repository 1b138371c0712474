// Register-only peaks of the AMX tile instructions: int8 tdpbssd (16 x 16 x 64 products
// per instruction) and bf16 tdpbf16ps (16 x 16 x 32). oneDNN runs its bf16 convolutions
// and matmuls on AMX where the core has it, so the bf16 baseline's peak is this one, not
// vdpbf16ps's. Called only when cpuid, the OS and the process's tile permission allow
// AMX (peak_probes.cpp).
#include <immintrin.h>

#include <cstring>

#include "peak.h"
#include "peak_impl.h"

namespace dfp {
namespace {

// Palette 1: every tile 16 rows of 64 bytes.
struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// Four independent accumulators (tiles 4-7) fed by two A tiles (0, 1) and two B tiles
// (2, 3): a tile product's latency is covered by the other three. (The tile
// instructions take constant tile numbers, hence a macro.)
#define DFP_FOUR_TILE_PRODUCTS(product) \
  product(4, 0, 2);                     \
  product(5, 0, 3);                     \
  product(6, 1, 2);                     \
  product(7, 1, 3)

template <typename Body>
double tile_peak(int64_t iterations, double macs_per_instruction, Body four_products) {
  TileConfig config;
  std::memset(&config, 0, sizeof config);
  config.palette = 1;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  const double gmacs = peak_detail::gmacs(iterations, 4 * macs_per_instruction, [&](int64_t n) {
    for (int64_t i = 0; i < n; ++i) four_products();
  });
  _tile_release();
  return gmacs;
}

}  // namespace

double peak_int8_gmacs_amx(int64_t iterations) {
  return tile_peak(iterations, 16 * 16 * 64, [] { DFP_FOUR_TILE_PRODUCTS(_tile_dpbssd); });
}

double peak_bf16_gmacs_amx(int64_t iterations) {
  return tile_peak(iterations, 16 * 16 * 32, [] { DFP_FOUR_TILE_PRODUCTS(_tile_dpbf16ps); });
}

}  // namespace dfp
