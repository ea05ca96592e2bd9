"""One TRL ``SFTTrainer`` run (``trl-fft`` or ``trl-lora``) on lota's batches, a child of the
throughput benchmark: prints its per-step rows (step and loop times, loss, the batch's token
counts and digest) as one JSON line.

    python -m bench.throughput.trl_run KIND SPEC-JSON
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .gate import Gate
from .inputs import batch_stats

# the settings the parent passes on (with the paths and the gate)
CHILD_KEYS = "steps batch_size lr seed max_length lora_r lora_alpha trl_fft_params".split()


def main(kind: str, spec: dict) -> None:
    """One TRL run (``trl-fft`` or ``trl-lora``); prints its per-step rows as one JSON line."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lota.targets import resolve_targets

    gate = Gate(*spec["gate"]) if spec["gate"] else None  # when taking turns with lota

    def wait_turn():
        if gate:
            gate.wait()

    class StepClock(TrainerCallback):
        """Wall time of each optimizer step (on_step_begin to on_step_end), of each whole loop
        iteration (from the previous step's end, waiting for a turn excluded), and the logged
        loss of each step."""

        def __init__(self):
            self.rows, self.losses, self.begin, self.end = [], {}, 0.0, 0.0

        def on_train_begin(self, args, state, control, **kw):
            wait_turn()
            self.end = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.rows.append({"step_s": now - self.begin, "cycle_s": now - self.end})
            wait_turn()
            self.end = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses[state.global_step] = logs["loss"]

    class Counted:
        """The trainer's collator, counting each batch it builds (outside the timed step)."""

        def __init__(self, collate):
            self.collate, self.batches = collate, []

        def __call__(self, features):
            b = self.collate(features)
            self.batches.append(batch_stats(b))
            return b

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    peft_config = None
    if kind == "trl-lora":
        peft_config = LoraConfig(
            r=spec["lora_r"],
            lora_alpha=spec["lora_alpha"],
            lora_dropout=0.0,
            bias="none",
            target_modules=spec["lora_modules"],
            task_type="CAUSAL_LM",
        )
    elif spec["trl_fft_params"] == "targets":  # the tensors `lota adapt --method fft` trains
        targets = resolve_targets(model)
        for n, p in model.named_parameters():
            p.requires_grad_(n in targets)
    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    config = SFTConfig(
        output_dir=spec["out"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is on; lota does not checkpoint
        max_length=spec["max_length"],
        packing=False,
        completion_only_loss=True,
        train_sampling_strategy="sequential",  # the examples come in lota's batch order
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        seed=spec["seed"],
        use_cpu=True,
        disable_tqdm=True,
    )
    clock = StepClock()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[clock],
    )
    trainer.data_collator = counted = Counted(trainer.data_collator)
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    out = []
    for i, (t, b) in enumerate(zip(clock.rows, counted.batches, strict=False)):
        out.append({"step": i + 1, "loss": clock.losses.get(i + 1), **t, **b})
    print(json.dumps({"rows": out, "trainable": trainable, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
