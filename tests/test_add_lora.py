"""peftkern.add_lora on plain transformers models, saved and loaded in PEFT's file layout."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers
from conftest import DEVICE, HAS_CUDA, assert_close, run_seed
from test_fuse import batch, tiny_gpt2, tiny_llama
from torch import nn
from torch.nn import functional as F

import peftkern
from peftkern.integrations.transformers import lora_layers
from peftkern.nn import IA3Linear, KronALinear, LoRALinear

peft = pytest.importorskip("peft")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32


def train(model, name, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        opt.zero_grad()
        model(**batch(name, seed=step)).loss.backward()
        opt.step()


@pytest.mark.parametrize("factory,targets,name", [(tiny_llama, ["q_proj", "v_proj", "down_proj"], "llama"),
                                                  (tiny_gpt2, ["c_attn", "c_fc"], "gpt2")])
def test_add_lora_trains_saves_and_loads_in_peft(tmp_path, factory, targets, name):
    torch.manual_seed(run_seed(0))
    model = factory().to(DEVICE, DTYPE)
    adapted = peftkern.add_lora(model, target_modules=targets, r=4, alpha=8, dropout=0.0)
    assert adapted and all(n.rsplit(".", 1)[-1] in targets for n in adapted)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable), "everything but the adapters is frozen"
    train(model, name)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n), "B moved off zero"
    model.eval()
    x = batch(name)
    expected = model(**x).logits
    config, loaded, _ = round_trip(model, factory, x, expected, tmp_path)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and sorted(config["target_modules"]) == sorted(targets)
    assert sorted(loaded) == sorted(adapted)


def round_trip(model, factory, x, expected, tmp_path):
    """save_lora, PEFT's from_pretrained on a fresh model of the same seed, PEFT's save_pretrained, load_lora on a
    fresh model: both give `expected`. Returns the saved config, load_lora's names and its model."""
    peftkern.save_lora(model, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    torch.manual_seed(run_seed(0))
    peft_model = peft.PeftModel.from_pretrained(factory().to(DEVICE, DTYPE), str(tmp_path)).eval()
    assert_close(peft_model(**x).logits, expected, DTYPE, "PEFT loads what peftkern saved")
    # and the other way round: PEFT's own save_pretrained loads into a plain model with load_lora
    peft_dir = tmp_path / "from_peft"
    peft_model.save_pretrained(str(peft_dir))
    torch.manual_seed(run_seed(0))
    plain = factory().to(DEVICE, DTYPE)
    loaded = peftkern.load_lora(plain, str(peft_dir))
    assert_close(plain.eval()(**x).logits, expected, DTYPE, "load_lora reads PEFT's save_pretrained")
    return config, loaded, plain


def test_add_lora_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="matched no"):
        peftkern.add_lora(tiny_llama(), target_modules=["nonexistent"])


def test_load_lora_reads_peft_rank_and_alpha_patterns(tmp_path):
    """PEFT keys rank_pattern / alpha_pattern by name suffixes or regexes, not full module names."""
    torch.manual_seed(run_seed(0))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                          rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 32, r"layers\.1\.self_attn\.o_proj": 2})
    peft_model = peft.get_peft_model(tiny_llama().to(DEVICE, DTYPE), cfg).eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(str(tmp_path))
    torch.manual_seed(run_seed(0))
    plain = tiny_llama().to(DEVICE, DTYPE)
    assert len(peftkern.load_lora(plain, str(tmp_path))) == 6
    layers = plain.model.layers
    assert (layers[0].self_attn.q_proj.r, layers[0].self_attn.v_proj.alpha) == (8, 32)
    assert (layers[0].self_attn.o_proj.alpha, layers[1].self_attn.o_proj.alpha) == (8, 2)
    x = batch("llama")
    # PEFT's adapters are fp32 beside the base (its default); on a GPU the base is bf16: the model tolerance
    assert_close(plain.eval()(**x).logits, peft_model(**x).logits, DTYPE, "patterns", 5.0 if HAS_CUDA else 1.0)


def test_load_lora_reads_peft_files_that_hold_the_heads_weight(tmp_path):
    """PEFT saves an adapted lm_head's whole weight beside its factors (save_embedding_layers="auto"), and loads it
    back into the model; load_lora refused such files as holding more than LoRA factors (an exploratory test,
    2026-12-08). It copies the weight in (after unmerging a layer that is adapted and merged already: a review found
    the copy made before the unmerge, which then took s B A off it), and refuses a model whose vocabulary differs
    before changing it. A head with a bias (Phi's) has its bias saved too."""
    torch.manual_seed(run_seed(0))
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    peft_model = peft.get_peft_model(tiny_llama().to(DEVICE, DTYPE), cfg).eval()
    with torch.no_grad():  # a head changed beside the adapter (trained, resized): the file's copy is what loads
        peft_model.base_model.model.lm_head.base_layer.weight.mul_(1.5)
    with warnings.catch_warnings():  # PEFT says it saves the head's weight
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path))
    torch.manual_seed(run_seed(0))
    resized = tiny_llama().to(DEVICE, DTYPE)
    resized.resize_token_embeddings(96)
    with pytest.raises(ValueError, match="resize the model's embeddings"):
        peftkern.load_lora(resized, str(tmp_path))
    assert not any(isinstance(m, LoRALinear) for m in resized.modules()), "refused before anything changed"
    torch.manual_seed(run_seed(0))
    plain = tiny_llama().to(DEVICE, DTYPE)
    assert sorted(peftkern.load_lora(plain, str(tmp_path))) == ["lm_head", "model.layers.0.self_attn.q_proj",
                                                                "model.layers.1.self_attn.q_proj"]
    x = batch("llama")
    tol = 5.0 if HAS_CUDA else 1.0  # PEFT's float32 factors beside a bf16 base on a GPU
    assert_close(plain.eval()(**x).logits, peft_model(**x).logits, DTYPE, "lm_head's saved weight", tol)
    torch.manual_seed(run_seed(0))
    resumed = tiny_llama().to(DEVICE, DTYPE)
    peftkern.add_lora(resumed, ["q_proj", "lm_head"], r=4)
    for layer in lora_layers(resumed).values():
        nn.init.normal_(layer.lora_B)
        layer.merge()
    peftkern.load_lora(resumed, str(tmp_path))
    assert_close(resumed.eval()(**x).logits, peft_model(**x).logits, DTYPE, "into merged layers", tol)

    def tiny_phi():
        torch.manual_seed(run_seed(0))
        return transformers.PhiForCausalLM(transformers.PhiConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=128,
            max_position_embeddings=64)).to(DEVICE, DTYPE)

    phi = peft.get_peft_model(tiny_phi(), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                          init_lora_weights=False)).eval()
    with torch.no_grad():
        phi.base_model.model.lm_head.base_layer.bias.add_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        phi.save_pretrained(str(tmp_path / "phi"))
    plain_phi = tiny_phi()
    peftkern.load_lora(plain_phi, str(tmp_path / "phi"))
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    assert_close(plain_phi.eval()(input_ids=ids).logits, phi(input_ids=ids).logits, DTYPE, "Phi's head bias", tol)


def test_add_lora_twice_trains_and_saves_both(tmp_path):
    """A second add_lora froze the first one's factors (freeze_base) and save_lora named only its own targets, so
    PEFT loaded the file without the first call's layers."""
    torch.manual_seed(run_seed(0))
    model = tiny_llama().to(DEVICE, DTYPE)
    peftkern.add_lora(model, target_modules=["q_proj"], r=4)
    peftkern.add_lora(model, target_modules=["v_proj"], r=2)
    trainable = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n, p in model.named_parameters()
                 if p.requires_grad}
    assert trainable == {"q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    peftkern.save_lora(model, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["rank_pattern"]
    torch.manual_seed(run_seed(0))
    again = tiny_llama().to(DEVICE, DTYPE)
    assert len(peftkern.load_lora(again, str(tmp_path))) == 4
    x = batch("llama")
    assert torch.equal(again.eval()(**x).logits, model.eval()(**x).logits)


@pytest.mark.parametrize("extra", [dict(bias="all"), dict(lora_bias=True)], ids=["bias", "lora_bias"])
def test_load_lora_refuses_what_it_would_drop(tmp_path, extra):
    """load_lora reads lora_A / lora_B and the modules_to_save: a PEFT checkpoint holding more (biases) loaded without
    them and gave another model. It now raises and names PEFT's loader."""
    torch.manual_seed(run_seed(0))
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], **extra))
    peft_model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="PeftModel.from_pretrained"):
        peftkern.load_lora(tiny_llama(), str(tmp_path))


def test_modules_to_save_trains_saves_and_loads_with_peft(tmp_path):
    """PEFT's modules_to_save: a classifier head made at random trains beside the adapters (add_lora froze it: the
    head stayed random), stays trainable through a second add_lora call, and save_lora / load_lora carry it in PEFT's
    keys, both ways (load_lora refused PEFT's file of a SEQ_CLS model)."""
    from test_fuse import tiny_bert
    torch.manual_seed(run_seed(0))
    model = tiny_bert().to(DEVICE, DTYPE)
    head = model.classifier.weight.detach().clone()
    peftkern.add_lora(model, target_modules=["query", "value"], r=4, alpha=8, modules_to_save=["classifier"])
    peftkern.add_lora(model, target_modules=["key"], r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(".lora_" in n for n in trainable - {"classifier.weight", "classifier.bias"})
    train(model, "bert")
    assert not torch.equal(model.classifier.weight, head), "the head trained"
    model.eval()
    x = batch("bert")
    expected = model(**x).logits
    # the fresh models have the same base and the untrained head: the file's head must replace it
    config, loaded, plain = round_trip(model, tiny_bert, x, expected, tmp_path)
    assert config["modules_to_save"] == ["classifier"] and len(loaded) == 6
    assert plain.classifier.weight.requires_grad and plain.classifier.bias.requires_grad


def test_modules_to_save_refusals_leave_the_model_alone(tmp_path):
    from test_fuse import tiny_bert
    model = tiny_bert()
    with pytest.raises(ValueError, match="named no module"):
        peftkern.add_lora(model, target_modules=["query"], modules_to_save=["score"])
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
    # a head of another size in the file: refused before any layer changes
    peft_model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    peft_model.save_pretrained(str(tmp_path))
    other = tiny_bert()
    other.classifier = nn.Linear(64, 5)
    with pytest.raises(ValueError, match="shape"):
        peftkern.load_lora(other, str(tmp_path))
    assert not lora_layers(other) and all(p.requires_grad for p in other.parameters())
    # a layer the model lacks (a file of a deeper model): refused before any layer changes (the layers before it were
    # adapted, and the base frozen)
    shallow = tiny_bert()
    shallow.bert.encoder.layer = shallow.bert.encoder.layer[:1]
    with pytest.raises(ValueError, match="layer.1.attention.self.query"):
        peftkern.load_lora(shallow, str(tmp_path))
    assert not lora_layers(shallow) and all(p.requires_grad for p in shallow.parameters())


def test_modules_to_save_match_as_peft_does(tmp_path):
    """PEFT's rules: a name that ends with a target is saved (DistilBERT's SEQ_CLS file holds pre_classifier: load_lora
    refused it), no LoRA goes inside a module to save (save_lora raised on the head's LoRA tensors written twice), and
    a weight tied to another module is untied (GPT-2's lm_head: loading the head overwrote the token embedding)."""
    cfg = transformers.DistilBertConfig(dim=64, hidden_dim=128, n_layers=1, n_heads=4, vocab_size=128,
                                        max_position_embeddings=64, num_labels=3)
    x = {"input_ids": batch("llama")["input_ids"]}
    torch.manual_seed(run_seed(0))
    peft_model = peft.get_peft_model(transformers.DistilBertForSequenceClassification(cfg).to(DEVICE, DTYPE),
                                     peft.LoraConfig(r=2, target_modules=["q_lin"], task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name or "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path / "distilbert"))
    torch.manual_seed(run_seed(0))
    plain = transformers.DistilBertForSequenceClassification(cfg).to(DEVICE, DTYPE)
    peftkern.load_lora(plain, str(tmp_path / "distilbert"))
    assert {"pre_classifier.weight", "classifier.weight"} <= {n for n, p in plain.named_parameters() if p.requires_grad}
    assert_close(plain.eval()(**x).logits, peft_model.eval()(**x).logits, DTYPE, "load_lora reads pre_classifier")

    from test_fuse import tiny_bert
    model = tiny_bert()
    adapted = peftkern.add_lora(model, target_modules=["dense"], modules_to_save=["pooler"])
    assert adapted and not any("pooler" in n for n in adapted)
    peftkern.save_lora(model, str(tmp_path / "pooler"))

    torch.manual_seed(run_seed(0))
    gpt2 = tiny_gpt2().to(DEVICE, DTYPE)
    embedding = gpt2.transformer.wte.weight.detach().clone()
    peftkern.add_lora(gpt2, target_modules=["c_attn"], modules_to_save=["lm_head"])
    assert gpt2.lm_head.weight is not gpt2.transformer.wte.weight and not gpt2.transformer.wte.weight.requires_grad
    train(gpt2, "gpt2")
    assert torch.equal(gpt2.transformer.wte.weight, embedding) and not torch.equal(gpt2.lm_head.weight, embedding)
    x = batch("gpt2")
    _, _, loaded = round_trip(gpt2.eval(), tiny_gpt2, x, gpt2(**x).logits, tmp_path / "gpt2")
    assert torch.equal(loaded.transformer.wte.weight, embedding), "load_lora leaves the tied embedding alone"


def test_save_lora_keeps_each_layers_scaling_across_calls(tmp_path):
    """A second add_lora call with use_rslora=True beside plain layers: PEFT's config has one use_rslora, so the odd
    layers' scaling goes into alpha_pattern (rsLoRA's alpha / sqrt(r) = (alpha sqrt(r)) / r). Reloaded, the model
    computes the same (it differed by up to 0.13 in the logits)."""
    torch.manual_seed(run_seed(0))
    model = tiny_llama().to(DEVICE, DTYPE)
    peftkern.add_lora(model, target_modules=["q_proj"], r=4)
    peftkern.add_lora(model, target_modules=["v_proj"], r=8, use_rslora=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    peftkern.save_lora(model, str(tmp_path))
    x = batch("llama")
    want = model.eval()(**x).logits
    torch.manual_seed(run_seed(0))
    again = tiny_llama().to(DEVICE, DTYPE)
    peftkern.load_lora(again, str(tmp_path))
    assert_close(again.eval()(**x).logits, want, torch.float32, "reloaded by peftkern")
    torch.manual_seed(run_seed(0))
    peft_model = peft.PeftModel.from_pretrained(tiny_llama().to(DEVICE, DTYPE), str(tmp_path)).eval()
    assert_close(peft_model(**x).logits, want, DTYPE, "reloaded by PEFT", 5.0 if HAS_CUDA else 1.0)


def test_freeze_base_freezes_an_unfrozen_base_weight_but_no_adapter():
    torch.manual_seed(run_seed(0))
    model = tiny_llama().to(DEVICE, DTYPE)
    peftkern.add_lora(model, target_modules=["q_proj"], r=2)
    q = model.model.layers[0].self_attn.q_proj
    q.weight.requires_grad_(True)
    peftkern.add_lora(model, target_modules=["v_proj"], r=2)
    assert not q.weight.requires_grad and q.lora_A.requires_grad and q.lora_B.requires_grad


# add_lora / save_lora / load_lora as a PyTorch user meets them (a review of the nn layers, 2026-12-05); each test
# failed before its fix.


class _ScaledLinear(nn.Linear):
    """An nn.Linear subclass with its own forward (as a quantized or otherwise custom layer has)."""

    def forward(self, x):
        return super().forward(x) * 3.0


def test_add_lora_refuses_a_linear_with_its_own_forward():
    """LoRALinear computes x W^T + b from the weight: a subclass's forward was dropped (the output changed at init,
    where B = 0 must leave it alone). add_lora raises before it changes anything; a subclass that keeps
    nn.Linear's forward (MultiheadAttention's NonDynamicallyQuantizableLinear) is adapted."""
    model = nn.Sequential(nn.Linear(8, 8), _ScaledLinear(8, 8), nn.Linear(8, 4)).to(DEVICE)
    with pytest.raises(TypeError, match="own forward does not compute"):
        peftkern.add_lora(model, target_modules=["0", "1"], r=2)
    assert type(model[0]) is nn.Linear and type(model[1]) is _ScaledLinear, "nothing replaced"
    assert all(p.requires_grad for p in model.parameters()), "nothing frozen"
    for layer in (LoRALinear, peftkern.nn.IA3Linear, peftkern.nn.KronALinear):
        with pytest.raises(TypeError, match="own forward does not compute"):
            layer.from_linear(_ScaledLinear(8, 8))
    plain = nn.Sequential(nn.modules.linear.NonDynamicallyQuantizableLinear(8, 8)).to(DEVICE)
    assert peftkern.add_lora(plain, target_modules=["0"], r=2) == ["0"]
    # a forward of its own that computes x W^T + b (transformers' FalconLinear, every Falcon projection) is adapted:
    # the first version of the check refused every Falcon model (the review of the change, 2026-12-05)
    torch.manual_seed(run_seed(1))
    written_out = nn.Sequential(_WrittenOutLinear(8, 8)).to(DEVICE)
    x = torch.randn(3, 8, device=DEVICE)
    expected = written_out(x)
    assert peftkern.add_lora(written_out, target_modules=["0"], r=2) == ["0"]
    assert_close(written_out(x), expected, torch.float32, "a written-out linear, adapted at init")


class _LearnedScaleLinear(nn.Linear):
    """transformers' DoryLMHead: the product times a learned scale, 1 at init."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logit_scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return super().forward(x) * self.logit_scale


class _Float32OutputLinear(nn.Linear):
    """transformers' ErgoLinearWithFP32Output (Ergo's router): autocast off, float32 out."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


class _SlightlyScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 1.015


def test_add_lora_refuses_a_linear_whose_forward_differs_in_scale_dtype_or_parameters():
    """The try of a subclass's forward compared two random rows' values only, within 2e-2 in 16-bit: a bf16 product
    1.5% off, a float32 output from a bf16 weight (or under autocast) and a learned scale of 1 at the try (a later
    checkpoint made it 2) were all adapted, and the fused layers dropped them (an exploratory test of transformers'
    DoryLMHead and Ergo's router, 2026-12-07)."""
    cases = [(_LearnedScaleLinear, torch.float32, True), (_Float32OutputLinear, torch.bfloat16, True),
             (_Float32OutputLinear, torch.float32, False), (_SlightlyScaledLinear, torch.bfloat16, True)]
    for cls, dtype, bias in cases:
        model = nn.Sequential(cls(64, 48, bias=bias)).to(DEVICE, dtype)
        with pytest.raises(TypeError, match="own forward does not compute"):
            peftkern.add_lora(model, target_modules=["0"], r=2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # a written-out product still passes in every dtype
        assert peftkern.add_lora(nn.Sequential(_WrittenOutLinear(64, 48)).to(DEVICE, dtype), ["0"], r=2) == ["0"]
    # a parameter registered as None is no state; a parametrized weight is named as such, not as the forward's fault
    # (the review of the change)
    none_param = _WrittenOutLinear(64, 48)
    none_param.register_parameter("scale", None)
    assert peftkern.add_lora(nn.Sequential(none_param).to(DEVICE), ["0"], r=2) == ["0"]
    from torch.nn.utils import parametrize

    parametrized = _WrittenOutLinear(64, 48)
    parametrize.register_parametrization(parametrized, "weight", nn.Identity())
    with pytest.raises(TypeError, match="weight is computed on each access"):
        LoRALinear.from_linear(parametrized)


def test_add_lora_refuses_a_linear_with_hooks():
    """A hook on the layer (accelerate's cpu_offload / device_map offload hook, which loads the weight from the CPU on
    each call) was dropped with the module: the adapted model then failed in its forward ("weight: meta") or ran
    without the user's hook. add_lora raises before it changes anything; an instance forward likewise."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).to(DEVICE)
    model[1].register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(TypeError, match="has hooks or an instance forward"):
        peftkern.add_lora(model, target_modules=["0", "1"], r=2)
    assert type(model[0]) is nn.Linear and all(p.requires_grad for p in model.parameters()), "nothing changed"
    bound = nn.Linear(8, 8)
    bound.forward = lambda x: x
    for layer in (LoRALinear, peftkern.nn.IA3Linear, peftkern.nn.KronALinear):
        with pytest.raises(TypeError, match="has hooks or an instance forward"):
            layer.from_linear(bound)


class _WrittenOutLinear(nn.Linear):
    """x W^T + b written out, as transformers' FalconLinear does."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_add_lora_tries_a_meta_layers_forward_through_a_cpu_twin():
    """The FSDP2 recipe builds the model on the meta device and attaches adapters there: add_lora on a meta Falcon
    model raised that FalconLinear's forward "does not compute x W^T + b", which it could not try (a meta weight
    holds no values; a review, 2026-12-05). Its class's forward is tried on a small CPU twin: a written-out product is
    adapted, a scaled one still refused, and the meta layers are left on meta."""
    with torch.device("meta"):
        written_out = nn.Sequential(_WrittenOutLinear(8, 8), nn.Linear(8, 4))
        scaled = nn.Sequential(_ScaledLinear(8, 8))
    assert peftkern.add_lora(written_out, target_modules=["0", "1"], r=2) == ["0", "1"]
    assert all(p.device.type == "meta" for p in written_out.parameters())
    with pytest.raises(TypeError, match="own forward does not compute"):
        peftkern.add_lora(scaled, target_modules=["0"], r=2)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False, bias=True)
    with torch.device("meta"):
        falcon = transformers.FalconForCausalLM(cfg)
    names = peftkern.add_lora(falcon, ["query_key_value", "dense"], r=2)
    assert len(names) == 4 and all(isinstance(falcon.get_submodule(n), LoRALinear) for n in names), names
    # then the recipe's to_empty and a load of real weights: the adapted model computes Falcon's product
    torch.manual_seed(run_seed(2))
    real = transformers.FalconForCausalLM(cfg).to(DEVICE)
    falcon.to_empty(device=DEVICE)
    missing, unexpected = falcon.load_state_dict(real.state_dict(), strict=False)
    assert not unexpected and all("lora_" in k for k in missing), (missing, unexpected)
    # each adapted layer at B = 0 is the real one (layer by layer: to_empty leaves the rotary embedding's
    # non-persistent buffer unset, which no state_dict restores)
    for n in names:
        layer = falcon.get_submodule(n)
        # the recipe's init of what to_empty left uninitialised: A Kaiming-uniform, B = 0. Zeroing B alone left A's
        # uninitialised memory, which held NaN at times (NaN * 0 is NaN; seen once on the CPU, torch 2.11)
        layer.reset_adapter_parameters()
        x = torch.randn(3, layer.in_features, device=DEVICE)
        assert_close(layer(x), real.get_submodule(n)(x), torch.float32, f"meta-built, loaded {n} at B = 0")


def test_add_lora_leaves_a_multihead_attention_out_proj_alone():
    """nn.MultiheadAttention never calls its out_proj: a LoRA there would not run (no effect, no gradient)."""
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "head": nn.Linear(8, 8)})
    with pytest.warns(RuntimeWarning, match="out_proj"):
        assert peftkern.add_lora(model, target_modules=["out_proj", "head"], r=2) == ["head"]
    assert type(model["attn"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def _lora_model(seed: int) -> nn.Module:
    torch.manual_seed(run_seed(seed))
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6)).to(DEVICE)


def _train_b(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("wrap", ["compile", "data-parallel"])
def test_save_lora_of_a_wrapped_model_writes_peft_keys(tmp_path, wrap):
    """torch.compile's OptimizedModule and DataParallel put _orig_mod. / module. into the names: save_lora wrote them
    into PEFT's keys, and neither load_lora nor PEFT found the layers again."""
    model = _lora_model(0)
    peftkern.add_lora(model, target_modules=["0", "2"], r=2)
    _train_b(model)
    x = torch.randn(3, 12, device=DEVICE)
    expected = model(x)
    wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model)
    peftkern.save_lora(wrapped, str(tmp_path))
    from safetensors.torch import load_file

    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == [f"base_model.model.{i}.lora_{f}.weight" for i in (0, 2) for f in "AB"], keys
    plain = _lora_model(0)
    assert sorted(peftkern.load_lora(plain, str(tmp_path))) == ["0", "2"]
    assert_close(plain(x), expected, torch.float32, "reloaded")


def test_load_lora_into_layers_adapted_already(tmp_path):
    """Resuming into a model that add_lora (or an earlier load_lora) adapted: load_lora said the names 'matched no
    nn.Linear'. It loads into the LoRALinear layers there (unmerging a merged one), and a rank that differs is a
    clear error."""
    model = _lora_model(0)
    peftkern.add_lora(model, target_modules=["0", "2"], r=2, alpha=6.0)
    _train_b(model)
    x = torch.randn(3, 12, device=DEVICE)
    expected = model(x)
    peftkern.save_lora(model, str(tmp_path))
    target = _lora_model(0)
    peftkern.add_lora(target, target_modules=["0", "2"], r=2, alpha=1.0)
    target[0].merge()
    assert sorted(peftkern.load_lora(target, str(tmp_path))) == ["0", "2"]
    assert not target[0].merged and target[0].alpha == 6.0
    assert_close(target(x), expected, torch.float32, "loaded into adapted layers")
    assert sorted(peftkern.load_lora(target, str(tmp_path))) == ["0", "2"], "twice"
    assert_close(target(x), expected, torch.float32, "loaded twice")
    other = _lora_model(0)
    peftkern.add_lora(other, target_modules=["0"], r=2, alpha=1.0)
    peftkern.add_lora(other, target_modules=["2"], r=4)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="rank 4 already"):
        peftkern.load_lora(other, str(tmp_path))
    # refused before any layer changed (the first layer was reloaded and re-configured before the check reached
    # the second, the review of the change)
    assert other[0].alpha == 1.0 and all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_save_lora_names_exactly_the_adapted_layers(tmp_path):
    """A regex that adapts some of the layers sharing a name (layer 1's q_proj of a Llama): target_modules held the
    last name alone, so PEFT's from_pretrained added fresh LoRA factors to layer 0's q_proj too, which a resumed run
    then trained (T5's decoder-only q / v: 12 layers for 8, a review, 2026-12-05). Where the last names name no
    other module they are kept, as PEFT users write them."""
    torch.manual_seed(run_seed(0))
    model = tiny_llama().to(DEVICE, DTYPE)
    adapted = peftkern.add_lora(model, r"model\.layers\.1\.self_attn\.q_proj|.*v_proj", r=4, alpha=8)
    assert adapted == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                       "model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.2)
    model.eval()
    x = batch("llama")
    config, loaded, _ = round_trip(model, tiny_llama, x, model(**x).logits, tmp_path / "subset")
    assert sorted(config["target_modules"]) == sorted(adapted)
    assert sorted(loaded) == sorted(adapted)
    torch.manual_seed(run_seed(0))
    peft_model = peft.PeftModel.from_pretrained(tiny_llama().to(DEVICE, DTYPE), str(tmp_path / "subset"))
    assert sorted(n.rpartition(".lora_A")[0].removeprefix("base_model.model.")
                  for n, _ in peft_model.named_modules() if n.endswith(".lora_A")) == sorted(adapted)
    every = tiny_llama().to(DEVICE, DTYPE)  # every layer's q_proj and v_proj: the short names say it
    peftkern.add_lora(every, ["q_proj", "v_proj"], r=4)
    peftkern.save_lora(every, str(tmp_path / "every"))
    assert json.loads((tmp_path / "every" / "adapter_config.json").read_text())["target_modules"] == ["q_proj",
                                                                                                     "v_proj"]


def _nested_model(seed: int) -> nn.Module:
    """nn.Sequential inside nn.Sequential: the top-level "0" is a suffix of "2.0", as PEFT's lists and patterns read
    names."""
    torch.manual_seed(run_seed(seed))
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(),
                         nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 6))).to(DEVICE)


def _adapted(model: nn.Module) -> dict:
    return {name: layer.r for name, layer in lora_layers(model).items()}


def test_load_lora_adapts_exactly_the_layers_a_file_names(tmp_path):
    """load_lora attached a dotless name as a list ([name]), which matches it as a suffix: a file adapting
    nn.Sequential's "0" adapted "2.0" as well (a trainable adapter the file does not hold, saved by the next
    save_lora), and a file adapting "0" and "2.0" at other ranks (save_lora's own) was refused ("'^2\\.0$' matched no
    nn.Linear")."""
    model = _nested_model(0)
    peftkern.add_lora(model, "0", r=2, alpha=4.0)  # a string: the full name "0" alone
    _train_b(model)
    x = torch.randn(5, 12, device=DEVICE)
    peftkern.save_lora(model, str(tmp_path / "first"))
    plain = _nested_model(0)
    assert peftkern.load_lora(plain, str(tmp_path / "first")) == ["0"]
    assert _adapted(plain) == {"0": 2}
    assert_close(plain(x), model(x), torch.float32, "the first layer's adapter")
    peftkern.add_lora(model, r"2\.0", r=3, alpha=6.0)
    _train_b(model)
    peftkern.save_lora(model, str(tmp_path / "both"))
    plain = _nested_model(0)
    assert sorted(peftkern.load_lora(plain, str(tmp_path / "both"))) == ["0", "2.0"]
    assert _adapted(plain) == {"0": 2, "2.0": 3}
    assert_close(plain(x), model(x), torch.float32, "both adapters")


def test_save_lora_patterns_and_targets_reach_their_own_layers_alone(tmp_path):
    """PEFT reads a rank_pattern / alpha_pattern key as the end of a name ("0" is "2.0" too) and a list of
    target_modules as suffixes: save_lora wrote the full names as they are, so PEFT and load_lora gave "2.0" the alpha
    saved for "0" (its logits 1.7 off with a 4x scaling, silently), and PEFT added an adapter to "2.0" where only "0"
    was adapted."""
    model = _nested_model(0)
    peftkern.add_lora(model, r"2\.0", r=2, alpha=2.0)
    peftkern.add_lora(model, "0", r=4, alpha=8.0)
    _train_b(model)
    x = torch.randn(5, 12, device=DEVICE)
    expected = model(x)
    peftkern.save_lora(model, str(tmp_path))
    plain = _nested_model(0)
    peftkern.load_lora(plain, str(tmp_path))
    assert {n: m.scaling for n, m in lora_layers(plain).items()} == {"0": 2.0, "2.0": 1.0}
    assert_close(plain(x), expected, torch.float32, "reloaded by peftkern")
    peft_model = peft.PeftModel.from_pretrained(_nested_model(0), str(tmp_path)).eval()
    assert_close(peft_model(x), expected, torch.float32, "reloaded by PEFT")
    only_first = _nested_model(1)
    peftkern.add_lora(only_first, "0", r=2)
    peftkern.save_lora(only_first, str(tmp_path / "first"))
    peft_model = peft.PeftModel.from_pretrained(_nested_model(1), str(tmp_path / "first"))
    assert sorted(n.rpartition(".lora_A")[0].removeprefix("base_model.model.")
                  for n, _ in peft_model.named_modules() if n.endswith(".lora_A")) == ["0"]


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_alpha_and_dropout_given_as_scalars_of_other_types_save_and_reload(tmp_path, kind):
    """add_lora and LoRALinear take alpha and dropout as a 0-d tensor or a numpy float (the checks read them), but kept
    them as given: save_lora's json.dump raised TypeError ("Object of type Tensor is not JSON serializable") after
    writing part of adapter_config.json. They are kept as floats."""
    import numpy as np

    alpha = torch.tensor(6.0 + run_seed(0) % 5) if kind == "tensor" else np.float32(6.0 + run_seed(0) % 5)
    model = _lora_model(0)
    peftkern.add_lora(model, ["0", "2"], r=2, alpha=alpha, dropout=np.float32(0.25))
    assert type(model[0].alpha) is float and type(model[0].scaling) is float and type(model[0].dropout) is float
    _train_b(model)
    model.eval()
    x = torch.randn(4, 12, device=DEVICE)
    peftkern.save_lora(model, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["lora_alpha"] == float(alpha) and config["lora_dropout"] == pytest.approx(0.25)
    plain = _lora_model(0)
    peftkern.load_lora(plain, str(tmp_path))
    assert_close(plain.eval()(x), model(x), torch.float32, "reloaded")


def test_add_lora_refuses_mamba_projections_the_mixer_never_calls():
    """A Mamba mixer multiplies by dt_proj's weight itself (and mamba-ssm's training kernels read out_proj's and
    x_proj's): add_lora adapted dt_proj silently, and the adapter never ran (the logits did not move with B random, a
    review, 2026-12-05). Refused before anything changes; x_proj gets a warning; in_proj is called and adapted."""
    config = transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=4, expand=2,
                                      conv_kernel=3)
    torch.manual_seed(run_seed(0))
    model = transformers.MambaForCausalLM(config).to(DEVICE)
    for targets in (["dt_proj"], ["in_proj", "out_proj"]):
        with pytest.raises(ValueError, match="would not run"):
            peftkern.add_lora(model, targets, r=2)
        assert not lora_layers(model) and all(p.requires_grad for p in model.parameters()), "nothing changed"
    with pytest.warns(RuntimeWarning, match="x_proj's weight directly"):
        peftkern.add_lora(model, ["x_proj"], r=2)
    assert sorted(peftkern.add_lora(model, ["in_proj"], r=2)) == ["backbone.layers.0.mixer.in_proj",
                                                                 "backbone.layers.1.mixer.in_proj"]
    ids = torch.randint(0, 64, (2, 6), device=DEVICE)
    base = model(ids).logits
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.5)
    assert (model(ids).logits - base).abs().max() > 1e-3, "the adapted projections run"
    every = transformers.MambaForCausalLM(config).to(DEVICE)  # all-linear: the uncalled ones left out, with a warning
    with pytest.warns(RuntimeWarning, match="all-linear leaves"):
        adapted = peftkern.add_lora(every, "all-linear", r=2)
    assert sorted({n.rsplit(".", 1)[-1] for n in adapted}) == ["in_proj", "x_proj"]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_all_linear_adapts_what_peft_adapts(factory):
    """PEFT's "all-linear" shorthand: every nn.Linear / Conv1D but the output layer. add_lora matched it as a regex,
    which named no module ("matched no nn.Linear", a review, 2026-12-05)."""
    torch.manual_seed(run_seed(0))
    model = factory().to(DEVICE, DTYPE)
    adapted = peftkern.add_lora(model, "all-linear", r=2)
    peft_model = peft.get_peft_model(factory().to(DEVICE, DTYPE), peft.LoraConfig(r=2, target_modules="all-linear"))
    expected = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A")
                      for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    assert sorted(adapted) == expected and "lm_head" not in adapted


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_merge_and_unload_gives_a_plain_model_that_saves_whole(tmp_path, factory):
    """add_lora's model saved by save_pretrained / the Trainer's save_model held the factors beside the frozen weight,
    and from_pretrained into the plain model dropped them (0.44 off the trained model, with only transformers' load
    report; a review, 2026-12-05), and peftkern had no merge_and_unload. It merges each layer and puts back the plain
    nn.Linear / Conv1D, whose save_pretrained then loads whole."""
    name = "llama" if factory is tiny_llama else "gpt2"
    torch.manual_seed(run_seed(0))
    model = factory().to(DEVICE)
    targets = ["q_proj", "v_proj", "down_proj"] if name == "llama" else ["c_attn", "c_fc"]
    adapted = peftkern.add_lora(model, targets, r=4, alpha=8, modules_to_save=["lm_head"])
    train(model, name)
    model.eval()
    x = batch(name)
    with torch.no_grad():
        expected = model(**x).logits
    kinds = {n: type(m) for n, m in factory().named_modules() if n in adapted}
    assert sorted(peftkern.merge_and_unload(model)) == sorted(adapted)
    assert not lora_layers(model) and {n: type(model.get_submodule(n)) for n in adapted} == kinds
    with torch.no_grad():
        assert_close(model(**x).logits, expected, torch.float32, "merged and unloaded", scale=10.0)
    model.save_pretrained(str(tmp_path))
    reloaded = type(model).from_pretrained(str(tmp_path)).to(DEVICE).eval()
    with torch.no_grad():
        assert_close(reloaded(**x).logits, expected, torch.float32, "reloaded by from_pretrained", scale=10.0)


def test_merge_and_unload_keeps_bottleneck_adapters_and_all_linear_leaves_their_projections():
    """merge_and_unload put a new layer in place of each LoRALinear without the bottleneck adapter hooks that
    add_adapters had put on it (0.35 off, silently); add_lora("all-linear") after add_adapters wrapped the adapters'
    own down / up projections, which froze them (their op reads the weights: the LoRA never ran). A review of the
    day's change, 2026-12-05."""
    torch.manual_seed(run_seed(0))
    model = tiny_llama().to(DEVICE).eval()
    peftkern.add_lora(model, ["o_proj", "down_proj"], r=4)
    peftkern.add_adapters(model, "houlsby")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = batch("llama")
    with torch.no_grad():
        expected = model(**x).logits
        peftkern.merge_and_unload(model)
        assert_close(model(**x).logits, expected, torch.float32, "adapters after merge_and_unload", scale=10.0)
    other = tiny_llama().to(DEVICE)
    peftkern.add_adapters(other, "parallel")
    adapted = peftkern.add_lora(other, "all-linear", r=2)
    assert adapted and not [n for n in adapted if "bottleneck_adapters" in n]
    assert all(p.requires_grad for n, p in other.named_parameters() if "bottleneck_adapters" in n)


@pytest.mark.parametrize("make", [lambda: LoRALinear(8, 6, r=2), lambda: IA3Linear(8, 6), lambda: KronALinear(8, 6)],
                         ids=["lora", "ia3", "krona"])
def test_merge_and_unload_refuses_a_model_that_is_a_peftkern_layer(make):
    """peftkern.merge_and_unload(layer) on a peftkern layer itself returned [] and left it unmerged, silently, where its
    docstring merges every peftkern layer of the model: it replaces layers inside a model, and the model's root has no
    parent to put the plain layer in. It refuses, naming the layer's own merge_and_unload (a review, 2026-12-06)."""
    torch.manual_seed(run_seed(0))
    layer = make().to(DEVICE)
    with pytest.raises(ValueError, match=r"merge_and_unload\(\)"):
        peftkern.merge_and_unload(layer)
    assert not layer.merged, "nothing changed"
    assert isinstance(layer.merge_and_unload(), nn.Linear)


def test_load_lora_loads_a_file_that_adapts_a_mamba_out_proj(tmp_path, monkeypatch):
    """Files that adapt Mamba's out_proj (ours before 2026-12-05; the mixer does call it on its slow path) load, with
    a warning, where add_lora now refuses the target."""
    from peftkern.integrations import transformers as integration

    config = transformers.MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64, state_size=4, expand=2,
                                      conv_kernel=3)
    torch.manual_seed(run_seed(0))
    model = transformers.MambaForCausalLM(config).to(DEVICE)
    with monkeypatch.context() as patch:  # the file as the older add_lora wrote it
        patch.setattr(integration, "MAMBA_UNCALLED", ())
        peftkern.add_lora(model, ["out_proj"], r=2)
    peftkern.save_lora(model, str(tmp_path))
    with pytest.warns(RuntimeWarning, match="loaded as the file says"):
        loaded = peftkern.load_lora(transformers.MambaForCausalLM(config).to(DEVICE), str(tmp_path))
    assert loaded == ["backbone.layers.0.mixer.out_proj"]


def test_a_tied_weight_is_named_at_add_lora_and_refused_by_merge_and_unload(tmp_path):
    """A LoRA on a tied lm_head (tie_word_embeddings) merged into the tensor the input embedding shares: the embedding
    changed by 1.3 and the merged model computed another function, without a word (a review, 2026-12-05). add_lora
    warns, merge_and_unload refuses before any layer changes, and merges once the weight is untied."""
    torch.manual_seed(run_seed(0))
    model = tiny_gpt2().to(DEVICE).eval()  # GPT-2 ties lm_head to wte
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.warns(RuntimeWarning, match="lm_head's weight is tied to transformer.wte.weight"):
        peftkern.add_lora(model, ["c_attn", "lm_head"], r=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = batch("gpt2")
    wte = model.transformer.wte.weight.detach().clone()
    with torch.no_grad():
        expected = model(**x).logits
    with pytest.raises(ValueError, match="tied to transformer.wte.weight"):
        peftkern.merge_and_unload(model)
    assert len(lora_layers(model)) == 3 and torch.equal(model.transformer.wte.weight, wte), "nothing changed"
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    assert "lm_head" in peftkern.merge_and_unload(model)
    assert torch.equal(model.transformer.wte.weight, wte), "the embedding is left alone"
    with torch.no_grad():
        assert_close(model(**x).logits, expected, torch.float32, "merged after untying", scale=10.0)
    model.save_pretrained(str(tmp_path))  # what the error message promises of the untied model
    reloaded = type(model).from_pretrained(str(tmp_path)).to(DEVICE).eval()
    with torch.no_grad():
        assert_close(reloaded(**x).logits, expected, torch.float32, "reloaded after untying", scale=10.0)
