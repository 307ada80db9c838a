// Bilinear sampling of one level and its gradient: the math every MSDA kernel
// shares, written once for the CPU and CUDA kernels.
//
// Convention (the official op's, = grid_sample with align_corners=False and zero
// padding): a normalised location (x, y) in [0, 1] over a level of H x W pixels
// lands at pixel coordinates
//     w = x * W - 0.5,   h = y * H - 0.5
// (pixel centres sit at integer coordinates). The sample is
//     v(h, w) = hy*hx*v00 + hy*lx*v01 + ly*hx*v10 + ly*lx*v11
// with h0 = floor(h), w0 = floor(w), ly = h - h0, lx = w - w0, hy = 1 - ly,
// hx = 1 - lx and vYX the value at pixel (h0 + Y, w0 + X), zero off the map.
// A location with h <= -1, w <= -1, h >= H or w >= W contributes nothing and
// receives no gradient. NaN and +-inf fail those comparisons and are treated the
// same way: outside the map.
//
// Gradient of v with respect to the normalised location (lx moves with w, w with x):
//     dv/dx = W * (hy*(v01 - v00) + ly*(v11 - v10))
//     dv/dy = H * (hx*(v10 - v00) + lx*(v11 - v01))
// The kernels reduce over channels first: with g the upstream gradient of the
// output row and dot_k = sum_c g_c * v_k,c, every gradient of one sample follows
// from the four dot products, so a sample costs two FMAs per channel and corner.
#pragma once

#include <cmath>
#include <cstdint>

#include "ddetr/scalar.h"

namespace ddetr {

// floor for |x| < 2^31 through truncation, which SIMD units do natively (a libm
// floor call would stop a loop over samples from vectorising).
template <class A> DDETR_HD int32_t floor_to_int(A x) {
  const int32_t t = int32_t(x);
  return t - int32_t(x < A(t));
}

// Corners in the order 00, 01, 10, 11 (row offset, column offset).
// Pixel indices are 32-bit (validate() caps a level at 2^31 - 1 pixels): SIMD units
// convert between float and int32 natively, which lets CPU loops over samples vectorise.
template <class A> struct Bilinear {
  int32_t pixel[4];  // y * W + x within the level; -1 when the corner is off the map
  A weight[4];       // bilinear weight, 0 for corners off the map
  A ly, lx;          // fractional parts, kept for the gradient
};

// Fills `b` for the normalised location (x, y) on an H x W level. Returns false
// when the location contributes nothing (outside the map, NaN or infinite); `b`
// then holds four off-map corners. Branch-free, so a loop over samples that calls
// it can keep several samples in flight (and vectorise).
template <class A>
DDETR_HD bool bilinear_setup(A x, A y, int32_t H, int32_t W, Bilinear<A>& b) {
  const A w = x * A(W) - A(0.5);
  const A h = y * A(H) - A(0.5);
  const bool inside = (h > A(-1)) & (w > A(-1)) & (h < A(H)) & (w < A(W));
  // Pin positions off the map so the integer conversion stays defined (NaN, inf).
  const A hc = inside ? h : A(-2), wc = inside ? w : A(-2);
  const int32_t h0 = floor_to_int(hc), w0 = floor_to_int(wc);
  b.ly = hc - A(h0);
  b.lx = wc - A(w0);
  const A hy = A(1) - b.ly, hx = A(1) - b.lx;
  // Inside the map h0 <= H - 1 and h0 + 1 >= 0, so one test per side is enough.
  // Masks as 0/1 integers rather than branches or selects: the loops over samples
  // that call this stay branch-free and vectorise.
  const int32_t top = int32_t(inside) & int32_t(h0 >= 0);
  const int32_t bottom = int32_t(inside) & int32_t(h0 + 1 <= H - 1);
  const int32_t left = int32_t(w0 >= 0), right = int32_t(w0 + 1 <= W - 1);
  const int32_t on[4] = {top & left, top & right, bottom & left, bottom & right};
  const int32_t pix[4] = {h0 * W + w0, h0 * W + w0 + 1, (h0 + 1) * W + w0, (h0 + 1) * W + w0 + 1};
  const A wt[4] = {hy * hx, hy * b.lx, b.ly * hx, b.ly * b.lx};
  for (int k = 0; k < 4; ++k) {
    b.pixel[k] = on[k] * (pix[k] + 1) - 1;  // -1 off the map
    b.weight[k] = A(on[k]) * wt[k];
  }
  return inside;
}

// The attention weight folded into a corner's bilinear weight: `attn * weight`, or 0
// for a corner of weight 0 (off the map, or a fractional part of exactly 0), so an
// infinite or NaN attention weight adds nothing through corners that take no part in
// the sample (inf * 0 would be NaN). With finite weights this is `attn * weight`.
template <class A> DDETR_HD A fold_weight(A attn, A weight) {
  return weight != A(0) ? attn * weight : A(0);
}

// Gradients of one weighted sample `attn * v(x, y)` given dot[k] = <g, v_k>
// (0 for corners off the map): d/d attn, d/dx and d/dy.
template <class A> struct SampleGrad {
  A attn, x, y;
};

template <class A>
DDETR_HD SampleGrad<A> bilinear_backward(const Bilinear<A>& b, const A dot[4], A attn,
                                         int32_t H, int32_t W) {
  const A hy = A(1) - b.ly, hx = A(1) - b.lx;
  SampleGrad<A> g;
  g.attn = b.weight[0] * dot[0] + b.weight[1] * dot[1] + b.weight[2] * dot[2] +
           b.weight[3] * dot[3];
  g.x = attn * A(W) * (hy * (dot[1] - dot[0]) + b.ly * (dot[3] - dot[2]));
  g.y = attn * A(H) * (hx * (dot[2] - dot[0]) + b.lx * (dot[3] - dot[1]));
  return g;
}

}  // namespace ddetr
