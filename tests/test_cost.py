"""The Step-3 cost model reproduces the paper's tables from the presets and from config.json files."""
import json

import pytest

from afford.cli import main as cli
from afford.config import ConfigError
from afford.cost.afd import min_sparsity, sizing
from afford.cost.hardware import HARDWARE, get_hardware
from afford.cost.hf import load_spec, spec_from_config
from afford.cost.model import costs
from afford.cost.specs import PRESETS

P = ["h800", "h20", "a800", "910b"]

TABLE2 = {  # KV bytes, attention FLOPs, linear FLOPs, FFN FLOPs at 8K (Step-3 TR Table 2)
    "deepseek-v3": (2.88e8, 1.47e11, 2.28e10, 4.84e10), "kimi-k2": (2.88e8, 7.37e10, 1.23e10, 4.84e10),
    "qwen3-235b-a22b": (7.89e8, 2.52e10, 1.34e10, 2.84e10), "qwen3-32b": (1.07e9, 1.72e10, 1.21e10, 5.03e10),
    "llama-4-maverick": (1.01e9, 8.05e9, 6.04e9, 2.42e10), "minimax-m1": (9.23e8, 3.42e9, 3.75e10, 5.44e10),
    "ernie-4.5-300b-a47b": (9.06e8, 1.45e10, 1.63e10, 7.61e10), "pangu-pro-moe": (8.05e8, 8.05e9, 6.04e9, 2.38e10),
    "step3": (2.56e8, 3.27e10, 2.07e10, 5.33e10),
}
TABLE6 = {  # attention 8K (h800, h20, a800, 910b), FFN (same order), USD per 1M tokens
    "deepseek-v3": ((0.054, 0.128, 0.114, 0.113), (0.014, 0.036, 0.032, 0.032)),
    "kimi-k2": ((0.051, 0.065, 0.057, 0.057), (0.014, 0.036, 0.032, 0.032)),
    "qwen3-235b-a22b": ((0.135, 0.054, 0.091, 0.101), (0.008, 0.021, 0.019, 0.019)),
    "qwen3-32b": ((0.181, 0.069, 0.120, 0.133), (0.014, 0.038, 0.034, 0.033)),
    "llama-4-maverick": ((0.169, 0.060, 0.109, 0.121), (0.007, 0.018, 0.016, 0.016)),
    "minimax-m1": ((0.164, 0.079, 0.121, 0.132), (0.015, 0.041, 0.036, 0.036)),
    "ernie-4.5-300b-a47b": ((0.155, 0.063, 0.105, 0.116), (0.021, 0.057, 0.051, 0.051)),
    "pangu-pro-moe": ((0.135, 0.049, 0.088, 0.098), (0.007, 0.018, 0.016, 0.016)),
    "step3": ((0.048, 0.040, 0.040, 0.043), (0.015, 0.040, 0.036, 0.035)),
}


def sig3(x: float) -> str:
    return f"{x:.2e}"


@pytest.mark.parametrize("name", list(TABLE2))
def test_table2_every_cell(name):
    w = PRESETS[name].per_token(8192)
    got = (w["kv_bytes"], w["attention_flops"], w["linear_flops"], w["ffn_flops"])
    assert [sig3(g) for g in got] == [sig3(e) for e in TABLE2[name]]


def test_table5_unit_costs():
    want = {"h800": ("2.80e-19", "1.66e-16"), "h20": ("7.51e-19", "5.56e-17"), "a800": ("6.68e-19", "1.04e-16"),
            "910b": ("6.65e-19", "1.16e-16")}
    for k, (flop, byte) in want.items():
        hw = HARDWARE[k]
        # the paper prints H800's 2.806e-19 truncated as 2.80e-19
        ok = (flop, "2.81e-19") if k == "h800" else (flop,)
        assert f"{hw.usd_per_flop:.2e}" in ok and f"{hw.usd_per_byte:.2e}" == byte


@pytest.mark.parametrize("name", list(TABLE6))
def test_table6_8k_and_ffn_columns(name):
    r = costs(PRESETS[name], 8192, get_hardware(P))
    attn, ffn = TABLE6[name]
    assert [round(r["attention_cost"][k], 3) for k in P] == list(attn)
    assert [round(r["ffn_cost"][k], 3) for k in P] == list(ffn)


def test_headline_afd_pairings():
    r = costs(PRESETS["step3"], 8192, get_hardware(P))
    assert (r["afd"]["attention_hardware"], r["afd"]["ffn_hardware"], round(r["afd"]["cost"], 3)) == ("h20", "h800", 0.055)
    assert round(costs(PRESETS["qwen3-235b-a22b"], 8192, get_hardware(P))["afd"]["cost"], 3) == 0.062


def test_table7_min_sparsity_and_b_moe():
    want = {"h800": 0.058, "h20": 0.007, "a800": 0.031, "910b": 0.034}
    for k, s in want.items():
        hw = HARDWARE[k]
        assert round(min_sparsity(7168, 61, hw, hw.net_gbps), 3) == s
    b = {k: sizing(PRESETS["step3"], HARDWARE[k])["min_ffn_batch_moe"] for k in P}
    assert [round(b[k], -1) for k in P] == [3620, 450, 960, 1070]
    assert round(sizing(PRESETS["step3"], HARDWARE["h800"])["stage_budget_us_per_layer"]) == 273


DSV3_CONFIG = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
               "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
               "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
               "n_routed_experts": 256, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "q_lora_rank": 1536,
               "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}
QWEN3_MOE_CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 4096,
                    "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
                    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1536,
                    "intermediate_size": 12288, "mlp_only_layers": []}
STEP3_CONFIG = {"model_type": "step3_text", "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 64,
                "head_dim": 256, "share_q_dim": 2048, "num_attention_groups": 1, "intermediate_size": 18432,
                "moe_intermediate_size": 5120, "moe_num_experts": 48, "moe_top_k": 3, "share_expert_dim": 5120,
                "moe_layers_enum": ",".join(str(i) for i in range(4, 60))}
QWEN3_32B_CONFIG = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 5120,
                    "intermediate_size": 25600, "num_hidden_layers": 64, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "head_dim": 128}


@pytest.mark.parametrize("cfg,preset", [(DSV3_CONFIG, "deepseek-v3"), (QWEN3_MOE_CONFIG, "qwen3-235b-a22b"),
                                        (STEP3_CONFIG, "step3"), (QWEN3_32B_CONFIG, "qwen3-32b")])
def test_config_json_gives_the_preset_numbers(tmp_path, cfg, preset):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = load_spec(str(tmp_path))
    for c in (8192, 32768):
        assert spec.per_token(c) == pytest.approx(PRESETS[preset].per_token(c))
    assert spec.sparsity == pytest.approx(PRESETS[preset].sparsity)


def test_cli_json_is_one_object(capsys):
    assert cli(["cost", "--model", "step3", "--context", "8192", "--hardware", "h800,h20", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert set(obj) >= {"model", "context", "kv_bytes", "attention_flops", "linear_flops", "ffn_flops",
                        "arithmetic_intensity", "attention_cost", "ffn_cost", "total_cost", "afd"}
    assert set(obj["attention_cost"]) == {"h800", "h20"}


def test_bad_input(capsys):
    with pytest.raises(ConfigError, match="known: deepseek-v3"):
        load_spec("not-a-model")
    with pytest.raises(ConfigError, match="known: h800"):
        get_hardware("h999")
    with pytest.raises(ConfigError, match="positive"):
        PRESETS["step3"].per_token(0)
    with pytest.raises(ConfigError, match="lacks"):
        spec_from_config({"model_type": "llama", "hidden_size": 64})
    with pytest.raises(ConfigError, match="not a family"):
        spec_from_config({"model_type": "gpt2", "n_embd": 64})
    assert cli(["cost", "--model", "step3", "--hardware", "tpu"]) == 2
    assert "known" in capsys.readouterr().err


def test_live_cost_in_metrics_and_stats(llama_dir):
    from afford import LLM, SamplingParams
    from afford.cost.hf import spec_from_model_config
    llm = LLM(str(llama_dir), dtype="float32", cost_hardware="h100")
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    spec = spec_from_model_config(llm.engine.model_config, 4)
    want = costs(spec, 8, get_hardware("h100"))["total_cost"]["h100"]
    assert out.metrics["modeled_usd_per_1m_tokens"] == pytest.approx(want)
    assert "modeled $" in llm.stats.line() and "h100" in llm.stats.line()
    with pytest.raises(ConfigError, match="known"):
        LLM(str(llama_dir), cost_hardware="tpu9")


def test_a_measured_flops_table_calibrates_the_afd_pipeline():
    """--custom-hardware flops@ROWS=F: products of few rows at their measured FLOP/s, interpolated in
    log(rows) and flat beyond the table; a table at the peak everywhere changes nothing."""
    from afford.cost.afd import pipeline
    from afford.cost.hardware import custom_hardware
    flat = custom_hardware("cpu:flops=1e11,bw=1e10,net=20")
    table = custom_hardware("cpu:flops=1e11,bw=1e10,net=20,flops@64=8e10,flops@4=2e10,flops@256=1e11")
    assert table.flops_by_rows == ((4.0, 2e10), (64.0, 8e10), (256.0, 1e11))            # sorted by rows
    assert table.flops_at(1) == 2e10 and table.flops_at(4) == 2e10 and table.flops_at(1000) == 1e11
    assert table.flops_at(16) == pytest.approx(5e10)                                      # halfway in log(rows)
    assert flat.flops_at(3) == 1e11
    same = custom_hardware("cpu:flops=1e11,bw=1e10,net=20,flops@1=1e11,flops@512=1e11")
    spec = PRESETS["qwen3-32b"]
    for m in (1, 3):
        assert pipeline(spec, same, 96, 128, m) == pytest.approx(pipeline(spec, flat, 96, 128, m))
        slow, fast = pipeline(spec, table, 96, 128, m), pipeline(spec, flat, 96, 128, m)
        assert slow["ffn_us"] > fast["ffn_us"] and slow["attention_us"] > fast["attention_us"]
    # a MoE with dense layers and a shared expert (Llama-4 Maverick: 24 dense + 24 MoE layers, 128 experts,
    # top-1, one shared expert): routed experts run at b*k/E rows' FLOP/s, dense layers and the shared
    # expert at b rows'
    mav = PRESETS["llama-4-maverick"]
    hw = custom_hardware("cpu:flops=1e12,bw=1e15,net=1e6,flops@1=1e10,flops@96=1e12")
    H, b, rate_expert = mav.hidden, 96, hw.flops_at(96 / 128)
    dense, moe = mav.ffn
    want = (dense.layers * b * 6 * H * dense.intermediate / 1e12
            + moe.layers * b * 6 * H * moe.intermediate / rate_expert       # routed: top-1 of 8192 each
            + moe.layers * b * 6 * H * moe.intermediate / 1e12) / mav.layers   # shared expert, 8192 wide
    assert pipeline(mav, hw, b, 128, 1)["ffn_us"] == pytest.approx(want * 1e6, rel=1e-9)
    # N data-parallel attention workers: each runs batch/N sequences, the FFN multiplies all of them at once
    two = pipeline(spec, table, 96, 128, 3, attention_workers=2)
    one = pipeline(spec, table, 48, 128, 3)
    assert two["attention_us"] == pytest.approx(one["attention_us"])                    # the same share each
    assert two["ffn_us"] == pytest.approx(pipeline(spec, table, 96, 128, 3)["ffn_us"])  # all 96 rows, m = 3
    assert pipeline(spec, table, 3, 128, 3, attention_workers=2)["micro_batches"] == 2   # 2 + 1 sequences: 2
    for bad in ("cpu:flops=1e11,bw=1e10,flops@0=1e9", "cpu:flops=1e11,bw=1e10,flops@x=1e9",
                "cpu:flops=1e11,bw=1e10,flops@8=-1"):
        with pytest.raises(ConfigError, match="flops@ROWS"):
            custom_hardware(bad)


def test_a_measured_kv_read_rate_prices_the_attention_reads():
    """--custom-hardware kv_bw=B: the attention stage reads K/V at that rate (its kernel's), not the GEMV
    bandwidth; the products and the FFN keep theirs; absent, K/V is read at bw."""
    from afford.cost.afd import pipeline
    from afford.cost.hardware import custom_hardware
    spec = PRESETS["qwen3-32b"]
    flat = custom_hardware("cpu:flops=1e15,bw=1e10,net=1e6")
    slow = custom_hardware("cpu:flops=1e15,bw=1e10,net=1e6,kv_bw=2.5e9")
    assert flat.kv_read_bw == 1e10 and slow.kv_read_bw == 2.5e9
    a, b = pipeline(spec, flat, 96, 4096, 1), pipeline(spec, slow, 96, 4096, 1)
    kv_s = 96 * spec.per_token(4096)["kv_bytes"] / spec.layers                      # one layer's K/V, bytes
    assert b["attention_us"] - a["attention_us"] == pytest.approx(kv_s * (1 / 2.5e9 - 1 / 1e10) * 1e6, rel=1e-6)
    assert b["ffn_us"] == a["ffn_us"]
    with pytest.raises(ConfigError, match="kv_bw"):
        custom_hardware("cpu:flops=1e11,bw=1e10,kv_bw=0")


def test_a_network_latency_adds_to_each_micro_batch_transfer():
    """--custom-hardware lat_us=US: each micro-batch's round trip pays the latency both ways."""
    from afford.cost.afd import pipeline
    from afford.cost.hardware import custom_hardware
    spec = PRESETS["qwen3-32b"]
    fast = custom_hardware("cpu:flops=1e12,bw=1e11,net=20")
    slow = custom_hardware("cpu:flops=1e12,bw=1e11,net=20,lat_us=50")
    for m in (1, 3):
        a, b = pipeline(spec, fast, 96, 128, m), pipeline(spec, slow, 96, 128, m)
        assert b["transfer_us"] - a["transfer_us"] == pytest.approx(m * 100)
    with pytest.raises(ConfigError, match="lat_us"):
        custom_hardware("cpu:flops=1e11,bw=1e10,lat_us=-1")
