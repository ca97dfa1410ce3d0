"""posttrain.models: what the loaders build from the config. LoRA targets that match no module are
a one-line error listing the model's linear layers (safeguard #19's unmatched-target half).

The other model behaviours are tested by topic: the bitsandbytes CPU repack guard in
test_bnb_guard.py, the packing probe in test_packing.py, pickle weights and trust_remote_code in
test_security.py, a checkpoint's sampling settings kept out of generation in
test_generation_defaults.py, tokenizers and templates in test_templates.py.
"""

from __future__ import annotations

import pytest

from posttrain import models
from posttrain.errors import PosttrainError
from posttrain.sections import LoraConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unmatched_lora_target_is_listed(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    with pytest.raises(PosttrainError, match=r"lora\.target_modules \['qproj'\] match no module") as e:
        models.lora_config(model, LoraConfig(target_modules=["q_proj", "qproj"]), train_embeddings=False)
    assert "q_proj" in e.value.fix and "o_proj" in e.value.fix and "'layers'" not in e.value.fix  # linear layers only
    # positive control: patterns that all match, by last name or by dotted suffix
    got = models.lora_config(model, LoraConfig(target_modules=["q_proj", "self_attn.v_proj"]), train_embeddings=False)
    assert set(got.target_modules) == {"q_proj", "self_attn.v_proj"}
