import json

import pytest
import torch

from relora.checkpoint import CheckpointError, build_model, load_state_dict, save_checkpoint
from relora.export import export_hf
from relora.lora import lora_modules
from relora.model import ModelConfig, PicoDecoder

transformers = pytest.importorskip("transformers")

CONFIG = ModelConfig(vocab_size=128, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden=96,
                     max_seq_len=32)
RELORA = {"name": "relora", "rank": 4, "alpha": 8, "scale": 2.0, "dropout": 0.0,
          "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "w_0", "w_1", "w_2"]}


@pytest.mark.parametrize("method", [{"name": "full"}, RELORA])
def test_exported_llama_has_the_same_logits(tmp_path, method):
    torch.manual_seed(0)
    model = build_model(CONFIG.to_dict(), method).eval()
    with torch.no_grad():
        for module in lora_modules(model):
            module.B_lora.normal_(0, 0.1)  # a non-zero adapter, so the effective weight matters
    save_checkpoint(model, tmp_path / "step_3", CONFIG.to_dict(), method, 3)
    export_hf(tmp_path / "step_3", tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_key_value_heads"] == 2


def test_reference_layout_loads_with_or_without_prefix():
    torch.manual_seed(1)
    source = PicoDecoder(CONFIG)
    prefixed = {f"pico_decoder.{k}": v for k, v in source.state_dict().items()}
    for state in (prefixed, source.state_dict()):
        target = PicoDecoder(CONFIG)
        load_state_dict(target, state)
        assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))
    bad = dict(source.state_dict())
    bad.pop("output_norm.weight")
    bad["layers.0.attention.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"missing \['output_norm.weight'\].*shape of layers.0.attention.q_proj"):
        load_state_dict(PicoDecoder(CONFIG), bad, source="released.safetensors")
