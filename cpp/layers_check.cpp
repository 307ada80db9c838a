// Checks and sizes of the native layers (ddetr/layers.h) shared by the CPU and CUDA
// passes.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "ddetr/layer_driver_pass.h"  // layer_detail::Dims

namespace ddetr {

void layer_saved_sizes(const LayerShape& s, const LayerOptions& o,
                       int64_t sizes[kLayerSavedCount]) {
  const layer_detail::Dims d(s, kLayerBlockRows);  // (no saved size depends on the block)
  const int64_t dec = s.decoder ? 1 : 0;
  const int64_t vals[kLayerSavedCount] = {
      dec * d.T * 3 * d.C,                              // qkv
      o.recompute ? 0 : dec * d.N * d.M * d.Lq * d.Lq,  // probs
      dec * d.T * d.C,                                  // sa_heads
      dec * d.T * d.C,                                  // xhat_sa
      dec * d.T,                                        // rstd_sa
      dec ? 0 : d.N * d.S * d.C,                        // value (encoder)
      d.T * 3 * d.K,                                    // raw
      dec * d.T * d.C,                                  // sampled (decoder)
      d.T * d.C,                                        // xhat_msda
      d.T,                                              // rstd_msda
      o.recompute ? 0 : d.T * d.F,                      // hidden
      d.T * d.C,                                        // xhat_ffn
      d.T,                                              // rstd_ffn
      dec * d.T * d.M * (d.C + 1)};                     // smem and coefficients
  std::copy(vals, vals + kLayerSavedCount, sizes);
}

void validate(const LayerShape& s) {
  auto bad = [](const std::string& what) { throw std::invalid_argument("layer: " + what); };
  validate(s.msda);
  if (s.N < 1 || s.Lq < 1 || s.C < 1 || s.F < 1)
    bad("N, Lq, d_model and dim_feedforward must be positive");
  if (s.msda.N != s.N || s.msda.Lq != s.Lq) bad("the MSDA shape's N / Lq differ from the layer's");
  if (s.msda.M * s.msda.D != s.C)
    bad("d_model (" + std::to_string(s.C) + ") != num_heads * head dim (" +
        std::to_string(s.msda.M) + " * " + std::to_string(s.msda.D) + ")");
  if (s.msda.S < 1) bad("the value maps are empty");
  if (s.ref_dim != 2 && s.ref_dim != 4) bad("reference points must have 2 or 4 coordinates");
}

}  // namespace ddetr
