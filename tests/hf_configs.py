"""Hugging Face config.json contents of today's MoE models (the fields moeplan reads, as the
models' own config files on the Hugging Face Hub give them) and their published sizes."""

MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
    "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "tie_word_embeddings": False}
QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
    "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "decoder_sparse_step": 1, "norm_topk_prob": False, "vocab_size": 151936,
    "max_position_embeddings": 8192, "tie_word_embeddings": False}
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048,
    "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
    "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
    "norm_topk_prob": False, "vocab_size": 50304, "max_position_embeddings": 4096,
    "router_aux_loss_coef": 0.01, "tie_word_embeddings": False}
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 2048,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "norm_topk_prob": False, "vocab_size": 102400,
    "max_position_embeddings": 163840, "aux_loss_alpha": 0.001, "tie_word_embeddings": False}
DEEPSEEK_V2 = dict(
    DEEPSEEK_V2_LITE, hidden_size=5120, num_hidden_layers=60, num_attention_heads=128,
    num_key_value_heads=128, q_lora_rank=1536, intermediate_size=12288,
    moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=2)
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "moe_intermediate_size": 768, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "norm_topk_prob": True, "vocab_size": 151936, "max_position_embeddings": 40960,
    "tie_word_embeddings": False}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "norm_topk_prob": True, "vocab_size": 129280,
    "max_position_embeddings": 163840, "tie_word_embeddings": False}

# (config, published total, published active, source)
PUBLISHED = {
    "mixtral-8x7b": (MIXTRAL_8X7B, 46.7e9, 12.9e9, "Mistral AI, Mixtral of Experts (2024)"),
    "qwen1.5-moe-a2.7b": (QWEN15_MOE_A27B, 14.3e9, 2.7e9, "Qwen1.5-MoE-A2.7B model card"),
    "olmoe-1b-7b": (OLMOE_1B_7B, 6.9e9, 1.3e9, "Muennighoff et al., OLMoE (2024)"),
    "deepseek-v2-lite": (DEEPSEEK_V2_LITE, 15.7e9, 2.4e9, "DeepSeek-V2-Lite model card"),
    "deepseek-v2": (DEEPSEEK_V2, 236e9, 21e9, "DeepSeek-V2 technical report"),
    "qwen3-30b-a3b": (QWEN3_30B_A3B, 30.5e9, 3.3e9, "Qwen3-30B-A3B model card"),
    "deepseek-v3": (DEEPSEEK_V3, 671e9, 37e9, "DeepSeek-V3 technical report (main model)"),
}
