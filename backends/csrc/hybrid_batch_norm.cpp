// hbn::hybrid_batch_norm: HBN's training forward and analytic backward as one torch operator, for
// CPU tensors.
//
// The math of hbn_core (docs/math.md) and of backends/torch.py's _FusedHybridBatchNormFunction:
// torch's fused kernels take the batch moments, the output and the backward's two sums; the
// per-channel arithmetic and the input gradient are plain loops here, and the autograd node is
// C++, so that a call costs about what torch's own BatchNorm costs rather than a Python call and
// two dozen tiny tensor ops. backends/torch.py builds this file on first use
// (torch.utils.cpp_extension) and falls back to the Python path where it cannot.
// tests/test_torch_adapter.py runs every case on every path. Per channel, with g = dL/dy:
//
//   w = sigmoid(alpha),  mu = (1-w) mu_B + w mu_G,  var = (1-w) var_B + w var_G  (var_B biased)
//   r = 1 / sqrt(var + eps),  y = weight (x - mu) r + bias
//   dx = weight r g - (1-w) (r/n) [S1 + r S2 (x - mu_B)],  S1 = weight sum(g),
//        S2 = weight sum(g x_hat)
//   dalpha = w (1-w) r [S1 (mu_B - mu_G) + r S2 (var_B - var_G) / 2]
//
// The backward's loops are not differentiable. When autograd records the backward (create_graph,
// for second-order gradients) or functorch batches its gradients (vmap, batched gradcheck), it
// calls hbn::hybrid_batch_norm_gradients instead: hbn_core's forward and backward on torch ops,
// which backends/torch.py registers in Python when it loads this operator.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The per-channel vectors of one call, contiguous, in x's dtype. w and 1 - w are computed once,
// in the forward, as sigmoid(alpha) and sigmoid(-alpha): neither cancels nor overflows.
struct Channels {
  at::Tensor weight, batch_mean, batch_var, global_mean, global_var, global_weight, batch_weight;
};

// w, 1 - w, mu and var from alpha and the four statistics.
std::pair<at::Tensor, at::Tensor> mix(Channels& c, const at::Tensor& alpha) {
  c.global_weight = at::empty_like(alpha);
  c.batch_weight = at::empty_like(alpha);
  at::Tensor mean = at::empty_like(alpha), var = at::empty_like(alpha);
  AT_DISPATCH_FLOATING_TYPES(alpha.scalar_type(), "hbn_mix", [&] {
    const scalar_t *a = alpha.data_ptr<scalar_t>(), *mu_b = c.batch_mean.data_ptr<scalar_t>(),
                   *var_b = c.batch_var.data_ptr<scalar_t>(),
                   *mu_g = c.global_mean.data_ptr<scalar_t>(),
                   *var_g = c.global_var.data_ptr<scalar_t>();
    scalar_t *w = c.global_weight.data_ptr<scalar_t>(), *bw = c.batch_weight.data_ptr<scalar_t>(),
             *mu = mean.data_ptr<scalar_t>(), *v = var.data_ptr<scalar_t>();
    for (int64_t i = 0; i < alpha.numel(); ++i) {
      const double e = std::exp(-std::abs(static_cast<double>(a[i])));  // in (0, 1]
      const double large = 1.0 / (1.0 + e), small = e / (1.0 + e);     // sigmoid(+-|alpha|)
      w[i] = a[i] >= 0 ? large : small;
      bw[i] = a[i] >= 0 ? small : large;
      mu[i] = bw[i] * mu_b[i] + w[i] * mu_g[i];
      v[i] = bw[i] * var_b[i] + w[i] * var_g[i];
    }
  });
  return {mean, var};
}

// torch's BatchNorm update of the running statistics (HybridBatchNorm._update_running_stats):
// running = (1 - m) running + m batch, with the Bessel-corrected batch variance for running_var;
// m = momentum, or 1 / num_batches_tracked (the cumulative average) when momentum is None.
void update_running_statistics(const at::Tensor& running_mean, const at::Tensor& running_var,
                               const at::Tensor& num_batches_tracked,
                               c10::optional<double> momentum, const Channels& c, int64_t count) {
  TORCH_CHECK(num_batches_tracked.scalar_type() == at::kLong,
              "hbn::hybrid_batch_norm takes an int64 num_batches_tracked; got ",
              num_batches_tracked.scalar_type());
  const int64_t batches = ++*num_batches_tracked.data_ptr<int64_t>();
  const double factor = momentum.has_value() ? *momentum : 1.0 / static_cast<double>(batches);
  const double bessel = static_cast<double>(count) / std::max<int64_t>(count - 1, 1);
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "hbn_running_statistics", [&] {
    const scalar_t *mu_b = c.batch_mean.data_ptr<scalar_t>(),
                   *var_b = c.batch_var.data_ptr<scalar_t>();
    scalar_t *mean = running_mean.data_ptr<scalar_t>(), *var = running_var.data_ptr<scalar_t>();
    for (int64_t i = 0; i < running_mean.numel(); ++i) {
      mean[i] += factor * (mu_b[i] - mean[i]);
      var[i] += factor * (bessel * var_b[i] - var[i]);
    }
  });
}

// y and the per-channel vectors that the backward needs; no autograd.
std::pair<at::Tensor, Channels> forward_values(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& alpha,
    const at::Tensor& global_mean, const at::Tensor& global_var,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked, c10::optional<double> momentum,
    double eps) {
  TORCH_CHECK(x.is_cpu(), "hbn::hybrid_batch_norm takes CPU tensors; got ", x.device());
  TORCH_CHECK(eps > 0 && std::isfinite(eps),
              "hbn::hybrid_batch_norm: eps must be positive and finite during training; got ", eps);
  TORCH_CHECK(x.numel() > 0, "hbn::hybrid_batch_norm takes a non-empty input; got shape ",
              x.sizes());
  auto [batch_mean, batch_var] = at::batch_norm_update_stats(x, {}, {}, 0.0);
  Channels c{weight.contiguous(), batch_mean, batch_var, global_mean.contiguous(),
             global_var.contiguous()};
  auto [mean, var] = mix(c, alpha.contiguous());
  if (running_mean.has_value()) {
    update_running_statistics(*running_mean, *running_var, *num_batches_tracked, momentum, c,
                              x.numel() / x.size(1));
  }
  return {at::batch_norm(x, weight, bias, mean, var, false, 0.0, eps, true), c};
}

at::Tensor hybrid_batch_norm_values(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& alpha,
    const at::Tensor& global_mean, const at::Tensor& global_var,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked, c10::optional<double> momentum,
    double eps) {
  return forward_values(x, weight, bias, alpha, global_mean, global_var, running_mean,
                        running_var, num_batches_tracked, momentum, eps)
      .first;
}

// dx = a x + b + d g per channel. An (N, C) input gets one pass, a loop over rows that the compiler
// vectorises over the channels; other inputs get torch's inference kernel and addcmul, whose
// vectorised passes over each channel's planes were measured faster than a loop (benchmarks).
at::Tensor input_gradient(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a,
                          const at::Tensor& b, const at::Tensor& d) {
  if (x.dim() > 2 || !x.is_contiguous() || !dy.is_contiguous()) {
    at::Tensor dx =
        at::batch_norm(x, a, b, at::zeros_like(a), at::ones_like(a), false, 0.0, 0.0, true);
    std::vector<int64_t> channel_shape(x.dim(), 1);
    channel_shape[1] = -1;
    return dx.addcmul_(dy, d.view(channel_shape));
  }
  at::Tensor dx = at::empty_like(x);
  const int64_t rows = x.size(0), channels = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hbn_input_gradient", [&] {
    const scalar_t* __restrict__ px = x.data_ptr<scalar_t>();
    const scalar_t* __restrict__ pg = dy.data_ptr<scalar_t>();
    const scalar_t *pa = a.data_ptr<scalar_t>(), *pb = b.data_ptr<scalar_t>(),
                   *pd = d.data_ptr<scalar_t>();
    scalar_t* __restrict__ out = dx.data_ptr<scalar_t>();
    const int64_t rows_per_task = std::max<int64_t>(1, at::internal::GRAIN_SIZE / channels);
    at::parallel_for(0, rows, rows_per_task, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin * channels; i < end * channels; i += channels) {
        for (int64_t ch = 0; ch < channels; ++ch) {
          out[i + ch] = pa[ch] * px[i + ch] + pb[ch] + pd[ch] * pg[i + ch];
        }
      }
    });
  });
  return dx;
}

// dx, dweight, dbias and dalpha from g = dy.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_values(
    const at::Tensor& dy, const at::Tensor& x, const Channels& c, double eps) {
  const int64_t channels = x.size(1);
  const double per_element = static_cast<double>(channels) / x.numel();  // 1 / n
  at::Tensor mean = at::empty_like(c.batch_mean), inv_std = at::empty_like(c.batch_mean);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hbn_backward_statistics", [&] {
    const scalar_t *w = c.global_weight.data_ptr<scalar_t>(),
                   *bw = c.batch_weight.data_ptr<scalar_t>(),
                   *mu_b = c.batch_mean.data_ptr<scalar_t>(),
                   *var_b = c.batch_var.data_ptr<scalar_t>(),
                   *mu_g = c.global_mean.data_ptr<scalar_t>(),
                   *var_g = c.global_var.data_ptr<scalar_t>();
    scalar_t *mu = mean.data_ptr<scalar_t>(), *r = inv_std.data_ptr<scalar_t>();
    for (int64_t i = 0; i < channels; ++i) {
      mu[i] = bw[i] * mu_b[i] + w[i] * mu_g[i];
      r[i] = 1.0 / std::sqrt(static_cast<double>(bw[i] * var_b[i] + w[i] * var_g[i]) + eps);
    }
  });
  // torch's fused backward reduction: sum(g x_hat) and sum(g), dweight and dbias.
  auto [unused, dweight, dbias] = at::native_batch_norm_backward(
      dy, x, {}, {}, {}, mean, inv_std, true, 0.0, {false, true, true});
  // dx = a x + b + d g with a = -(1-w)(r/n) r S2, b = -(1-w)(r/n) S1 - a mu_B, d = weight r.
  at::Tensor a = at::empty_like(inv_std), b = at::empty_like(inv_std);
  at::Tensor d = at::empty_like(inv_std), dalpha = at::empty_like(inv_std);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hbn_backward_coefficients", [&] {
    const scalar_t *gamma = c.weight.data_ptr<scalar_t>(),
                   *w = c.global_weight.data_ptr<scalar_t>(),
                   *bw = c.batch_weight.data_ptr<scalar_t>(),
                   *mu_b = c.batch_mean.data_ptr<scalar_t>(),
                   *var_b = c.batch_var.data_ptr<scalar_t>(),
                   *mu_g = c.global_mean.data_ptr<scalar_t>(),
                   *var_g = c.global_var.data_ptr<scalar_t>(), *r = inv_std.data_ptr<scalar_t>(),
                   *sum_g_xhat = dweight.data_ptr<scalar_t>(), *sum_g = dbias.data_ptr<scalar_t>();
    scalar_t *pa = a.data_ptr<scalar_t>(), *pb = b.data_ptr<scalar_t>(),
             *pd = d.data_ptr<scalar_t>(), *pdalpha = dalpha.data_ptr<scalar_t>();
    for (int64_t i = 0; i < channels; ++i) {
      const double s1 = gamma[i] * sum_g[i], r_s2 = r[i] * gamma[i] * sum_g_xhat[i];
      const double minus_share = -bw[i] * r[i] * per_element;
      pa[i] = minus_share * r_s2;
      pb[i] = minus_share * s1 - pa[i] * mu_b[i];
      pd[i] = gamma[i] * r[i];
      pdalpha[i] = w[i] * bw[i] * r[i] *
                   (s1 * (mu_b[i] - mu_g[i]) + 0.5 * r_s2 * (var_b[i] - var_g[i]));
    }
  });
  return {input_gradient(dy, x, a, b, d), dweight, dbias, dalpha};
}

// hbn_core's gradients on torch ops (registered from backends/torch.py): dx, dweight, dbias, dalpha.
std::vector<at::Tensor> composite_gradients(const at::Tensor& dy, const variable_list& saved,
                                            double eps) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hbn::hybrid_batch_norm_gradients", "")
          .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         double)>();
  return op.call(dy, saved[0], saved[1], saved[2], saved[3], saved[4], eps);
}

// Whether the backward must be differentiable or batchable: autograd records it (create_graph),
// or the gradient is a batched or functorch tensor (vmap over the backward, as
// torch.autograd.grad(is_grads_batched=True) and batched gradcheck do).
bool needs_composite_backward(const at::Tensor& dy) {
  constexpr auto wrapped = c10::DispatchKeySet({c10::DispatchKey::Batched,
                                                c10::DispatchKey::FuncTorchBatched,
                                                c10::DispatchKey::FuncTorchGradWrapper});
  return c10::GradMode::is_enabled() || dy.key_set().has_any(wrapped);
}

class HybridBatchNorm : public torch::autograd::Function<HybridBatchNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& alpha, const at::Tensor& global_mean,
                               const at::Tensor& global_var,
                               const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var,
                               const c10::optional<at::Tensor>& num_batches_tracked,
                               c10::optional<double> momentum, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, c] = forward_values(x, weight, bias, alpha, global_mean, global_var, running_mean,
                                 running_var, num_batches_tracked, momentum, eps);
    // The inputs (the composite backward differentiates through them), then the batch
    // statistics and the weights of the fast backward.
    ctx->save_for_backward({x, weight, alpha, global_mean, global_var, c.batch_mean, c.batch_var,
                            c.global_weight, c.batch_weight});
    ctx->saved_data["eps"] = eps;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    at::Tensor none;
    if (needs_composite_backward(grads[0])) {
      std::vector<at::Tensor> g = composite_gradients(grads[0], saved, eps);
      return {g[0], g[1], g[2], g[3], none, none, none, none, none, none, none};
    }
    Channels c{saved[1].contiguous(), saved[5], saved[6], saved[3].contiguous(),
               saved[4].contiguous(), saved[7], saved[8]};
    auto [dx, dweight, dbias, dalpha] =
        backward_values(grads[0].contiguous(), saved[0], c, eps);
    return {dx, dweight, dbias, dalpha, none, none, none, none, none, none, none};
  }
};

at::Tensor hybrid_batch_norm_autograd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& alpha,
    const at::Tensor& global_mean, const at::Tensor& global_var,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked, c10::optional<double> momentum,
    double eps) {
  return HybridBatchNorm::apply(x, weight, bias, alpha, global_mean, global_var, running_mean,
                                running_var, num_batches_tracked, momentum, eps)[0];
}

}  // namespace

TORCH_LIBRARY(hbn, m) {
  m.def(
      "hybrid_batch_norm(Tensor x, Tensor weight, Tensor bias, Tensor alpha, "
      "Tensor global_mean, Tensor global_var, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps) "
      "-> Tensor");
  // Implemented in Python (backends/torch.py): hbn_core's gradients on torch ops.
  m.def(
      "hybrid_batch_norm_gradients(Tensor dy, Tensor x, Tensor weight, Tensor alpha, "
      "Tensor global_mean, Tensor global_var, float eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hbn, CPU, m) { m.impl("hybrid_batch_norm", &hybrid_batch_norm_values); }

TORCH_LIBRARY_IMPL(hbn, AutogradCPU, m) {
  m.impl("hybrid_batch_norm", &hybrid_batch_norm_autograd);
}
