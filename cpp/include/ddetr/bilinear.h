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

// Corners in the order 00, 01, 10, 11 (row offset, column offset).
template <class A> struct Bilinear {
  int64_t pixel[4];  // y * W + x within the level; -1 when the corner is off the map
  A weight[4];       // bilinear weight, 0 for corners off the map
  A ly, lx;          // fractional parts, kept for the gradient
};

// Fills `b` for the normalised location (x, y) on an H x W level. Returns false
// when the location contributes nothing (outside the map, NaN or infinite); `b`
// then holds four off-map corners. Branch-free, so a loop over samples that calls
// it can keep several samples in flight (and vectorise).
template <class A>
DDETR_HD bool bilinear_setup(A x, A y, int64_t H, int64_t W, Bilinear<A>& b) {
  const A w = x * A(W) - A(0.5);
  const A h = y * A(H) - A(0.5);
  const bool inside = h > A(-1) && w > A(-1) && h < A(H) && w < A(W);
  // Pin positions off the map so floor and the integer conversion stay defined.
  const A hc = inside ? h : A(-2), wc = inside ? w : A(-2);
  const A h0f = floor_acc(hc), w0f = floor_acc(wc);
  const int64_t h0 = int64_t(h0f), w0 = int64_t(w0f);
  b.ly = hc - h0f;
  b.lx = wc - w0f;
  const A hy = A(1) - b.ly, hx = A(1) - b.lx;
  // Inside the map h0 <= H - 1 and h0 + 1 >= 0, so one test per side is enough.
  const bool top = inside && h0 >= 0, bottom = inside && h0 + 1 <= H - 1;
  const bool left = w0 >= 0, right = w0 + 1 <= W - 1;
  b.pixel[0] = (top && left) ? h0 * W + w0 : -1;
  b.pixel[1] = (top && right) ? h0 * W + w0 + 1 : -1;
  b.pixel[2] = (bottom && left) ? (h0 + 1) * W + w0 : -1;
  b.pixel[3] = (bottom && right) ? (h0 + 1) * W + w0 + 1 : -1;
  b.weight[0] = b.pixel[0] >= 0 ? hy * hx : A(0);
  b.weight[1] = b.pixel[1] >= 0 ? hy * b.lx : A(0);
  b.weight[2] = b.pixel[2] >= 0 ? b.ly * hx : A(0);
  b.weight[3] = b.pixel[3] >= 0 ? b.ly * b.lx : A(0);
  return inside;
}

// Gradients of one weighted sample `attn * v(x, y)` given dot[k] = <g, v_k>
// (0 for corners off the map): d/d attn, d/dx and d/dy.
template <class A> struct SampleGrad {
  A attn, x, y;
};

template <class A>
DDETR_HD SampleGrad<A> bilinear_backward(const Bilinear<A>& b, const A dot[4], A attn,
                                         int64_t H, int64_t W) {
  const A hy = A(1) - b.ly, hx = A(1) - b.lx;
  SampleGrad<A> g;
  g.attn = b.weight[0] * dot[0] + b.weight[1] * dot[1] + b.weight[2] * dot[2] +
           b.weight[3] * dot[3];
  g.x = attn * A(W) * (hy * (dot[1] - dot[0]) + b.ly * (dot[3] - dot[2]));
  g.y = attn * A(H) * (hx * (dot[2] - dot[0]) + b.lx * (dot[3] - dot[1]));
  return g;
}

}  // namespace ddetr
