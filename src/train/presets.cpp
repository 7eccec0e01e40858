// Model presets: the small models this engine trains on two cores, and the published shapes of
// the MoE systems of the literature (for `moe params`; docs/model.md lists the sources and how
// the counts compare with the published ones).
#include <fmt/core.h>

#include "moe/data.h"
#include "moe/trainer.h"

namespace moe {

namespace {

ModelConfig byte_model(int64_t d, int64_t layers, int64_t heads, int64_t kv, int64_t experts,
                       int64_t k, int64_t expert_ffn, int64_t dense_ffn) {
  ModelConfig c;
  c.vocab_size = ByteTokenizer::kVocabSize;
  c.d_model = d;
  c.n_layers = layers;
  c.n_heads = heads;
  c.n_kv_heads = kv;
  c.d_ffn = dense_ffn;
  c.max_seq_len = 512;
  c.moe.d_model = d;
  c.moe.n_experts = experts;
  c.moe.top_k = k;
  c.moe.d_ffn = expert_ffn;
  return c;
}

// A decoder with grouped-query attention and SwiGLU experts in every layer (Mixtral's family).
ModelConfig gqa_moe(int64_t vocab, int64_t d, int64_t layers, int64_t heads, int64_t kv,
                    int64_t experts, int64_t k, int64_t ffn, int64_t seq, double theta) {
  ModelConfig c;
  c.vocab_size = vocab;
  c.d_model = d;
  c.n_layers = layers;
  c.n_heads = heads;
  c.n_kv_heads = kv;
  c.d_ffn = ffn;
  c.max_seq_len = seq;
  c.rope_theta = theta;
  c.moe.d_model = d;
  c.moe.n_experts = experts;
  c.moe.top_k = k;
  c.moe.d_ffn = ffn;
  c.moe.z_loss_coef = 0;
  return c;
}

// DeepSeek's multi-head latent attention at its published size: 128 heads, q compressed to 1536,
// keys and values to 512, heads of 128 + 64 rotated, values of 128.
ModelConfig deepseek_attention(int64_t vocab, int64_t d, int64_t layers) {
  ModelConfig c;
  c.vocab_size = vocab;
  c.d_model = d;
  c.n_layers = layers;
  c.n_heads = 128;
  c.n_kv_heads = 128;
  c.max_seq_len = 163840;
  c.q_lora_rank = 1536;
  c.kv_lora_rank = 512;
  c.qk_nope_dim = 128;
  c.qk_rope_dim = 64;
  c.v_head_dim = 128;
  c.rope_interleave = true;
  c.norm_eps = 1e-6;
  c.moe.d_model = d;
  c.moe.z_loss_coef = 0;
  return c;
}

// DeepSeek-V3's layout (latent attention with q compression, first layers dense, one shared
// expert, sigmoid group-limited routing), which Mistral Large 3 shares.
ModelConfig deepseek_v3_like(int64_t vocab, int64_t experts, int64_t k, int64_t expert_ffn,
                             int64_t dense_ffn) {
  ModelConfig c = deepseek_attention(vocab, 7168, 61);
  c.d_ffn = dense_ffn;
  c.first_dense = 3;
  MoeConfig& m = c.moe;
  m.n_experts = experts;
  m.top_k = k;
  m.d_ffn = expert_ffn;
  m.n_shared = 1;
  m.router = RouterKind::deepseek;
  m.n_group = 8;
  m.topk_group = 4;
  m.routed_scaling_factor = 2.5;
  m.aux_loss_coef = 0.0001;
  return c;
}

// The Switch Transformer (Fedus et al. 2022, Table 9) as one stack: its encoder and decoder
// layers counted together (T5's encoder-decoder), ReLU experts of two matrices (T5's FFN), one
// expert per token, the 32128-token vocabulary with an untied output head. The stack has no
// cross-attention (the decoder's 4 D^2 per layer are missing) and its dense FFNs are SwiGLU
// (one matrix more than T5's): for Switch-Base the two nearly cancel, for Switch-C (every
// layer MoE) the missing cross-attention is 0.25B of 1571B.
ModelConfig switch_transformer(int64_t d, int64_t heads, int64_t layers, int64_t experts,
                               int64_t ffn, int64_t moe_every) {
  ModelConfig c;
  c.vocab_size = 32128;
  c.d_model = d;
  c.n_layers = 2 * layers;
  c.n_heads = heads;
  c.n_kv_heads = heads;
  c.head_dim = 64;
  c.d_ffn = ffn;
  c.max_seq_len = 512;
  c.moe_every = moe_every;
  c.moe.d_model = d;
  c.moe.n_experts = experts;
  c.moe.top_k = 1;
  c.moe.d_ffn = ffn;
  c.moe.act = ExpertAct::relu;
  c.moe.router = RouterKind::switch_top1;
  c.moe.renormalize = false;
  c.moe.capacity_factor = 1.25;
  return c;
}

using Maker = ModelConfig (*)();

struct Preset {
  const char* name;
  Maker make;
};

const Preset kPresets[] = {
    // tiny: for tests. small: the default MoE model, 8 experts top-2 of width 256 (the active
    // FFN width equals small-dense's 512).
    {"tiny", [] { return byte_model(64, 2, 4, 2, 4, 2, 128, 256); }},
    {"small", [] { return byte_model(128, 4, 4, 2, 8, 2, 256, 512); }},
    {"small-dense",
     [] {
       ModelConfig c = byte_model(128, 4, 4, 2, 8, 2, 256, 512);
       c.moe_every = 0;
       return c;
     }},
    // medium: the small model's layout four times as wide, for measuring kernels on products
    // of the width real models have (bf16 operands pay from here).
    {"medium", [] { return byte_model(512, 4, 8, 4, 8, 2, 1024, 2048); }},
    // Mistral AI, "Mixtral of Experts" (2024): 46.7B total, 12.9B active.
    {"mixtral-8x7b", [] { return gqa_moe(32000, 4096, 32, 32, 8, 8, 2, 14336, 32768, 1e6); }},
    // Mixtral 8x22B (Mistral AI, 2024): 141B total, 39B active.
    {"mixtral-8x22b", [] { return gqa_moe(32768, 6144, 56, 48, 8, 8, 2, 16384, 65536, 1e6); }},
    // DeepSeek-AI, "DeepSeek-V2" (2024): 236B total, 21B active. Its routing is group-limited
    // softmax top-6 (8 groups, 3 kept), which the topk router approximates without the groups;
    // the counts do not depend on it.
    {"deepseek-v2",
     [] {
       ModelConfig c = deepseek_attention(102400, 5120, 60);
       c.d_ffn = 12288;
       c.first_dense = 1;
       MoeConfig& m = c.moe;
       m.n_experts = 160;
       m.top_k = 6;
       m.d_ffn = 1536;
       m.n_shared = 1;  // the 2 shared experts as one MLP of twice the width
       m.d_shared_ffn = 2 * 1536;
       m.renormalize = false;
       m.routed_scaling_factor = 16.0;
       m.aux_loss_coef = 0.003;
       return c;
     }},
    // DeepSeek-AI, "DeepSeek-V3 Technical Report" (2024): 671B total, 37B active (without the
    // 14B multi-token-prediction module).
    {"deepseek-v3", [] { return deepseek_v3_like(129280, 256, 8, 2048, 18432); }},
    // Qwen team, "Qwen1.5-MoE" (2024): 14.3B total, 2.7B active; 60 experts top-4 plus a gated
    // shared expert, qkv biases.
    {"qwen1.5-moe-a2.7b",
     [] {
       ModelConfig c = gqa_moe(151936, 2048, 24, 16, 16, 60, 4, 1408, 8192, 1e6);
       c.d_ffn = 5632;
       c.qkv_bias = true;
       c.norm_eps = 1e-6;
       c.moe.renormalize = false;
       c.moe.n_shared = 1;
       c.moe.d_shared_ffn = 5632;
       c.moe.shared_gate = true;
       return c;
     }},
    // Databricks, "DBRX" (2024): 132B total, 36B active; 16 experts top-4, LayerNorm without
    // bias, clipped qkv.
    {"dbrx",
     [] {
       ModelConfig c = gqa_moe(100352, 6144, 40, 48, 8, 16, 4, 10752, 32768, 5e5);
       c.norm = NormKind::layer;
       c.clip_qkv = 8;
       return c;
     }},
    // xAI, Grok-1 (2024 open release): 314B total; "25% of the weights active on a given token"
    // (about 78B). The released code ties the output head to the embedding.
    {"grok-1",
     [] {
       ModelConfig c = gqa_moe(131072, 6144, 64, 48, 8, 8, 2, 32768, 8192, 1e4);
       c.tie_embeddings = true;
       return c;
     }},
    // Mistral AI, Mistral Large 3 (2025): 675B total (with a 2.5B vision encoder not counted
    // here), 41B active; DeepSeek-V3's layout with 128 experts of twice the width, top-4.
    {"mistral-large-3", [] { return deepseek_v3_like(131072, 128, 4, 4096, 16384); }},
    // Google, Switch Transformer (Fedus et al. 2022, Table 9): Switch-Base, 7.4B parameters (T5-
    // Base's shape, 12 + 12 layers, 128 experts in every other FFN); Switch-C, 1571B (2048 experts
    // in every FFN of 15 + 15 layers of width 2048).
    {"switch-base", [] { return switch_transformer(768, 12, 12, 128, 3072, 2); }},
    {"switch-c", [] { return switch_transformer(2048, 32, 15, 2048, 6144, 1); }},
    // Google, GShard (Lepikhin et al. 2021, Table 3): MoE(2048E, 36L), "beyond 600 billion
    // parameters" (the abstract); 18 + 18 layers of width 1024 (16 heads, FFN 8192, which with
    // T(96L) gives that table's 2.3B dense baseline), 2048 experts in every other FFN, top-2
    // GShard routing with expert capacity 2N/E, a 64000-token vocabulary.
    {"gshard-600b",
     [] {
       ModelConfig c = switch_transformer(1024, 16, 18, 2048, 8192, 2);
       c.vocab_size = 64000;
       c.moe.router = RouterKind::gshard;
       c.moe.top_k = 2;
       c.moe.capacity_factor = 2.0;
       return c;
     }},
    // GPT-4 as rumored (unconfirmed; OpenAI published no architecture): about 1.76T parameters,
    // 16 experts of which 2 per token, about 220B active.
    {"gpt-4-rumored", [] { return gqa_moe(100256, 8192, 120, 64, 8, 16, 2, 36864, 8192, 1e4); }},
};

}  // namespace

std::vector<std::string> model_preset_names() {
  std::vector<std::string> names;
  for (const Preset& p : kPresets) names.emplace_back(p.name);
  return names;
}

ModelConfig model_preset(const std::string& name) {
  for (const Preset& p : kPresets)
    if (name == p.name) return p.make();
  std::string names;
  for (const std::string& n : model_preset_names()) names += (names.empty() ? "" : ", ") + n;
  throw_error("preset", fmt::format("unknown preset '{}' ({})", name, names));
}

}  // namespace moe
