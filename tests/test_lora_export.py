"""Export of generated LoRA adapters (issue 17): PEFT's format, loaded by ``peft``, and merged weights.

A tiny Llama built from a config (nothing downloaded) gets a dynamic LoRA hypernetwork; the
adapters of one condition are written with ``save_peft`` and loaded with
``PeftModel.from_pretrained`` onto a fresh copy of the base model, which must give the
hypernetwork's output for that condition; so must a plain model loaded with
``merged_state_dict``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tolerances import DYNAMIC, STATIC, assert_close

from hypernn_gen.runtime.torch import TorchHyperNetwork

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@torch.no_grad()
def perturb_b(hypernetwork: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for head in hypernetwork.generator.heads_b:
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.05)


def tiny_gpt2() -> torch.nn.Module:
    """GPT-2's blocks use transformers' Conv1D (weight (in, out)), not nn.Linear."""
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, attn_implementation="eager"
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


#: model, number of adapted layers (every Linear / Conv1D in the blocks, not the LM head)
MODELS = {"llama": (tiny_llama, 14), "gpt2": (tiny_gpt2, 8)}


@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_peft_loads_the_export_and_gives_the_hypernetworks_output(
    tmp_path: Path, mode: str, model: str
) -> None:
    make, adapted = MODELS[model]
    base = make()
    options = {"condition_shape": (3,)} if mode == "dynamic" else {}
    hyper = TorchHyperNetwork(
        base, generate="lora", mode=mode, lora_rank=4, lora_alpha=8.0, **options
    ).eval()
    perturb_b(hyper)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    condition = torch.randn(2, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if mode == "dynamic":
            logits = hyper(input_ids=ids, condition=condition)[0].logits
            one = condition[1:2]
        else:
            logits = hyper(input_ids=ids)[0].logits
            one = None
        assert (logits - base(input_ids=ids).logits).abs().max() > 1e-3  # the adapters act
    hyper.save_peft(tmp_path / "adapter", condition=one)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert len(config["target_modules"]) == adapted  # the blocks' layers, not the LM head
    assert config["fan_in_fan_out"] == (model == "gpt2")  # Conv1D weights are (in, out)

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    expected = hyper.single_adapters(one)
    state = loaded.state_dict()
    for key, value in expected.items():  # the loaded weights are the generated ones
        torch.testing.assert_close(state[f"base_model.model.{key}.default.weight"], value)
    with torch.no_grad():
        peft_logits = loaded(input_ids=ids[1:2]).logits
        assert_close(peft_logits, logits[1:2], DYNAMIC if mode == "dynamic" else STATIC)

        merged = copy.deepcopy(base)
        merged.load_state_dict(hyper.merged_state_dict(one))
        assert_close(merged(input_ids=ids[1:2]).logits, logits[1:2], DYNAMIC)


def test_export_of_a_dynamic_hypernetwork_needs_a_condition(tmp_path: Path) -> None:
    hyper = TorchHyperNetwork(tiny_llama(), generate="lora", mode="dynamic", condition_shape=(3,))
    with pytest.raises(ValueError, match="exports the adapters of one condition: pass it"):
        hyper.save_peft(tmp_path / "a")


GPT2_TARGET = """
import torch
import transformers


def make_target():
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, attn_implementation="eager"
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


example_input = torch.zeros(2, 8, dtype=torch.long)
"""


def test_generated_gpt2_lora_adapts_conv1d_and_matches_its_runtime_twin(tmp_path: Path) -> None:
    """A generated file for GPT-2 (Conv1D layers) records them as transposed adapters, starts
    exactly at the base and gives its runtime twin's per-sample outputs."""
    from gen_support import hypernetwork_class, import_file

    from hypernn_gen.cli import main

    (tmp_path / "gpt2_target.py").write_text(GPT2_TARGET)
    out = tmp_path / "gpt2_lora.py"
    flags = ["--generate", "lora", "--mode", "dynamic", "--condition-shape", "3"]
    assert main([str(tmp_path / "gpt2_target.py"), *flags, "-o", str(out)]) == 0
    module = import_file(out)
    assert [a.path for a in module.ADAPTERS][:2] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
    ]
    assert all(a.transposed for a in module.ADAPTERS) and module.ADAPTERS[0][1:3] == (96, 32)
    base = tiny_gpt2()
    torch.manual_seed(0)
    runtime = TorchHyperNetwork(base, generate="lora", mode="dynamic", condition_shape=(3,)).eval()
    gen = hypernetwork_class(module)(base).eval()
    gen.load_state_dict(runtime.state_dict())
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    condition = torch.randn(2, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(
            gen(input_ids=ids, condition=condition)[0].logits, base(input_ids=ids).logits
        )
        perturb_b(runtime)
        gen.load_state_dict(runtime.state_dict())
        out_g = gen(input_ids=ids, condition=condition)[0].logits
        assert_close(out_g, runtime(input_ids=ids, condition=condition)[0].logits, STATIC)
        for b in range(2):
            merged = copy.deepcopy(base)
            merged.load_state_dict(runtime.merged_state_dict(condition[b : b + 1]))
            assert_close(out_g[b : b + 1], merged(input_ids=ids[b : b + 1]).logits, DYNAMIC)
