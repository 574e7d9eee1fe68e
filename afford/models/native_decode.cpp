// afford's native forward: a forward of a packed CPU fp32 Llama-family model (prefill, decode or verify,
// over the cpu_paged backend's plan) as ONE call from Python. It calls exactly the ATen operators the
// Python path calls (afford/models/transformer.py, afford/attention/paged_cpu.py), in the same order on
// the same layouts, so its logits are bitwise those of the Python path; what it removes is the per-operator cost of
// Python (argument parsing, nn.Module dispatch, attribute lookups): ~30 operators per layer, each a few
// microseconds, which is most of a small model's decode step (benchmarks/forward_overhead.py).
// Built on first use by torch.utils.cpp_extension (afford/models/native.py); the Python path stays the
// reference and the fallback.
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace {

// oneDNN's pre-packed product, as PackedLinear calls it for 2+ rows (torch.ops.mkldnn._linear_pointwise)
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed) {
  static auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                        c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  return op.call(x, packed, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), c10::string_view(""));
}

// One PackedLinear: W^T in two halves (parts, in, out/parts) for one row; up to mm_rows rows MKL's
// (W @ x^T)^T on W (out, in); more rows oneDNN's packed W.
struct Linear {
  at::Tensor weight_t, packed, bias, weight;  // bias: undefined when the layer has none
  int64_t mm_rows;

  at::Tensor operator()(const at::Tensor& x) const {      // x (N, in) -> (N, out)
    at::Tensor y;
    if (x.numel() == x.size(-1)) {
      y = at::matmul(x.reshape({1, 1, -1}), weight_t);    // (parts, 1, out/parts)
      y = y.transpose(0, 1).reshape({x.size(0), -1});     // (1, out)
    } else if (x.size(0) > mm_rows) {
      y = onednn_linear(x, packed);                       // (N, out)
    } else {
      y = at::mm(weight, x.t()).t().contiguous();         // (N, out)
    }
    return bias.defined() ? y + bias : y;
  }
};

struct Layer {
  at::Tensor norm1, norm2;
  Linear qkv, o, gate_up, down;
  at::Tensor k_pool, v_pool;                // (slots, KV, D)
};

class NativeDecoder {
 public:
  NativeDecoder(at::Tensor embed, at::Tensor rope_cos, at::Tensor rope_sin, at::Tensor final_norm,
                std::vector<at::Tensor> head, std::vector<std::vector<at::Tensor>> layers,
                int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, int64_t block_size, int64_t mm_rows)
      : embed_(std::move(embed)), cos_(std::move(rope_cos)), sin_(std::move(rope_sin)),
        final_norm_(std::move(final_norm)), H_(heads), KV_(kv_heads), D_(head_dim), eps_(eps), bs_(block_size),
        mm_rows_(mm_rows) {
    head_ = linear(head, 0);
    for (auto& t : layers) {
      // norm1, norm2, then 4 tensors (weight_t, packed, bias, weight) for each of qkv, o, gate_up, down,
      // then k_pool, v_pool
      TORCH_CHECK(t.size() == 20, "a layer is 20 tensors, got ", t.size());
      layers_.push_back(Layer{t[0], t[1], linear(t, 2), linear(t, 6), linear(t, 10), linear(t, 14), t[18], t[19]});
    }
  }

  // One forward over N flattened tokens: ids, positions, slots (N,) long. Attention either per sequence
  // (batched=false; sequence i feeds q_lens[i] tokens and attends to ctx_lens[i] positions: view_starts[i]
  // >= 0 -> its context is pool[view_starts[i] : + ctx_lens[i]]; -1 -> gather its blocks[i]; -2 -> a
  // prefill from position 0, causal over the K/V fed now; masks[i] (T, n) bool or empty) or for all at once
  // (batched=true, one token each: blocks[0] (B * nblk,) block ids, keep (B, 1, 1, L) key mask).
  // rows: the flat token indices that need logits (empty: all). Returns logits (R, V) float32.
  at::Tensor step(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& slots, bool batched,
                  const std::vector<int64_t>& q_lens, const std::vector<int64_t>& ctx_lens,
                  const std::vector<int64_t>& view_starts, const std::vector<at::Tensor>& blocks,
                  const std::vector<at::Tensor>& masks, const at::Tensor& keep, const at::Tensor& rows) {
    c10::InferenceMode guard;
    const int64_t N = ids.size(0), hidden = embed_.size(1);
    const bool gqa = KV_ != H_;
    at::Tensor x = at::embedding(embed_, ids);                              // (N, hidden)
    at::Tensor cos = cos_.index_select(0, positions).unsqueeze(-2);         // (N, 1, D)
    at::Tensor sin = sin_.index_select(0, positions).unsqueeze(-2);
    const int64_t half = D_ / 2;
    for (const Layer& L : layers_) {
      at::Tensor h = at::rms_norm(x, {hidden}, L.norm1, eps_);
      at::Tensor qkv = L.qkv(h).view({N, H_ + 2 * KV_, D_});               // (N, H + 2KV, D)
      at::Tensor qk0 = qkv.slice(1, 0, H_ + KV_);                           // (N, H + KV, D)
      at::Tensor rot = at::cat({-qk0.slice(-1, half), qk0.slice(-1, 0, half)}, -1);
      at::Tensor qk = qk0 * cos + rot * sin;                                // RoPE on q|k
      at::Tensor q = qk.slice(1, 0, H_), k = qk.slice(1, H_), v = qkv.slice(1, H_ + KV_);
      L.k_pool.index_copy_(0, slots, k);
      L.v_pool.index_copy_(0, slots, v);
      at::Tensor o;
      if (batched) {
        at::Tensor kc = L.k_pool.view({-1, bs_, KV_, D_}).index_select(0, blocks[0]).view({N, -1, KV_, D_}).transpose(1, 2);
        at::Tensor vc = L.v_pool.view({-1, bs_, KV_, D_}).index_select(0, blocks[0]).view({N, -1, KV_, D_}).transpose(1, 2);
        o = at::scaled_dot_product_attention(q.unsqueeze(2), kc, vc, keep, 0.0, false, std::nullopt, gqa).squeeze(2);
      } else {
        std::vector<at::Tensor> outs;
        int64_t off = 0;
        for (size_t i = 0; i < q_lens.size(); ++i) {
          const int64_t t = q_lens[i], n = ctx_lens[i], s = view_starts[i];
          at::Tensor qi = q.slice(0, off, off + t).transpose(0, 1).unsqueeze(0);      // (1, H, T, D)
          at::Tensor kc, vc;
          if (s == -2) {
            kc = k.slice(0, off, off + t);                                             // (T, KV, D)
            vc = v.slice(0, off, off + t);
          } else if (s >= 0) {
            kc = L.k_pool.slice(0, s, s + n);                                          // (n, KV, D), no copy
            vc = L.v_pool.slice(0, s, s + n);
          } else {
            kc = L.k_pool.view({-1, bs_, KV_, D_}).index_select(0, blocks[i]).view({-1, KV_, D_}).slice(0, 0, n);
            vc = L.v_pool.view({-1, bs_, KV_, D_}).index_select(0, blocks[i]).view({-1, KV_, D_}).slice(0, 0, n);
          }
          kc = kc.transpose(0, 1).unsqueeze(0);                                        // (1, KV, n, D)
          vc = vc.transpose(0, 1).unsqueeze(0);
          std::optional<at::Tensor> mask;
          if (masks[i].numel()) mask = masks[i];
          at::Tensor oi = at::scaled_dot_product_attention(qi, kc, vc, mask, 0.0, s == -2 && t > 1, std::nullopt, gqa);
          outs.push_back(oi[0].transpose(0, 1));                                      // (T, H, D)
          off += t;
        }
        o = outs.size() == 1 ? outs[0] : at::cat(outs);                               // (N, H, D)
      }
      x = x + L.o(o.reshape({-1, H_ * D_}));
      h = at::rms_norm(x, {hidden}, L.norm2, eps_);
      auto gu = L.gate_up(h).chunk(2, -1);
      x = x + L.down(at::silu(gu[0]) * gu[1]);
    }
    x = at::rms_norm(x, {hidden}, final_norm_, eps_);
    if (rows.numel()) x = x.index_select(0, rows);                                   // (R, hidden)
    return head_(x);                                                                  // (R, V)
  }

 private:
  // (weight_t, packed, bias, weight) at t[at..at+4); an empty bias tensor means none
  Linear linear(const std::vector<at::Tensor>& t, size_t at) const {
    return Linear{t[at], t[at + 1], t[at + 2].numel() ? t[at + 2] : at::Tensor(), t[at + 3], mm_rows_};
  }

  at::Tensor embed_, cos_, sin_, final_norm_;
  Linear head_;
  std::vector<Layer> layers_;
  int64_t H_, KV_, D_;
  double eps_;
  int64_t bs_, mm_rows_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<NativeDecoder>(m, "NativeDecoder")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>,
                          std::vector<std::vector<at::Tensor>>, int64_t, int64_t, int64_t, double, int64_t,
                          int64_t>())
      .def("step", &NativeDecoder::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
