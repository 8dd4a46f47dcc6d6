"""A complete run: a tiny Llama built from a config, PEFT LoRA, peftkern.fuse, the transformers Trainer for a
few steps, save_pretrained, and a reload in plain PEFT that gives the same outputs. Runs on a CPU in seconds.

    python examples/peft_trainer.py [--out DIR]
"""

import argparse
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import peftkern


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=32):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 128, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="peftkern-example-")

    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    report = peftkern.fuse(model)                       # the one line: PEFT's LoRA layers now run fused kernels
    print(report)

    trainer = Trainer(model=model, train_dataset=RandomTokens(),
                      args=TrainingArguments(output_dir=out, max_steps=10, per_device_train_batch_size=8,
                                             learning_rate=1e-3, logging_steps=5, report_to=[], save_strategy="no"))
    trainer.train()
    model.save_pretrained(out)                          # PEFT's own files, unchanged by fusing

    model.eval()
    ids = RandomTokens()[0]["input_ids"][None].to(model.device)
    fused_logits = model(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(tiny_llama().to(model.device), out).eval()   # plain PEFT, no peftkern
    diff = (reloaded(input_ids=ids).logits - fused_logits).abs().max().item()
    print(f"saved to {out}; max |plain PEFT reload - fused| = {diff:.2e}")
    assert diff < 1e-3, diff
    # the comparison says something only if the fused op computed fused_logits: no layer skipped, no call fell back
    assert report.fused and not report.skipped and not report.fallbacks, str(report)
    return {"diff": diff, "fused": len(report.fused), "fallbacks": dict(report.fallbacks)}


if __name__ == "__main__":
    main()
