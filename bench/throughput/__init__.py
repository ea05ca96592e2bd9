"""Training throughput of ``lota adapt`` against TRL's ``SFTTrainer`` on the CPU, and whether the
loss curves agree.

Two pairs, each side in its own process:
- ``fft``: ``lota adapt --method fft`` against ``SFTTrainer`` full fine-tuning;
- ``sparse``: the sparse phase of ``lota adapt --method lota`` (metrics phase ``train``; its
  calibration phase is not timed) against ``SFTTrainer`` with a PEFT LoRA adapter (r 16, alpha 32,
  dropout 0) on the layers lota adapts by default (every linear layer of the decoder blocks).

Both sides train the same model (a random Llama config written by this script, fp32) on the same
batches in the same order: lota's own order (``lota.data.batches`` with the run's seed), which TRL
reads sequentially; for the sparse pair TRL starts where lota's sparse phase starts, after the
batches its calibration used. Shared settings: AdamW (torch defaults: betas 0.9/0.999, eps 1e-8,
weight decay 0, not fused), constant learning rate without warm-up, gradient clipping at norm 1.0,
fp32 (no mixed precision; TRL's default gradient checkpointing off, as lota has none), the same
maximum length, no packing, loss on completion tokens only, ``--threads`` torch threads. TRL's
full fine-tuning trains the tensors ``lota adapt --method fft`` trains (the default targets; the
embeddings, norms and LM head stay frozen), unless ``--trl-fft-params all``.

Data: GSM8K train pairs from ``--data-dir`` (the project's shared data folder; prompt: the
question and a newline, completion: the worked answer) whose prompt fits in
``--prompt-fraction`` of ``--max-length`` byte tokens; the completion is cut to fill the rest.
Without the folder, synthetic arithmetic problems of the same form.

Interleaving (``--interleave``), over ``--repeats`` rounds whose pair order alternates:
- ``steps`` (default): the two runs of a pair take turns step by step. Each stops at a gate
  before its first training step and after every step until the benchmark lets it go, so the two
  never compute at the same time and the drift of a shared machine hits both alike at the scale
  of one step. Time spent at a gate is outside the step time and taken out of the loop time.
- ``runs``: the two runs of a pair one after the other (which goes first alternates by round).

Measured per step: wall time (lota: ``step_s`` of its metrics; TRL: a callback from
``on_step_begin`` to ``on_step_end``), the whole loop iteration ("cycle": end of one step to the
end of the next, data loading and logging included), the loss, the real (non-pad) tokens and the
completion tokens. The first ``--warmup`` steps of each run are not timed. Per round and pair, the
ratio of the median step times (lota over TRL); reported as the median over rounds with its range
and interquartile range. Tokens per second: real tokens over step time. Every batch TRL trained on
is compared with lota's (a digest of ids, mask and labels), and lota's logged token counts with
those batches.

Loss curves: per run and step the mean over rounds; Pearson correlation and the largest absolute
difference between the two sides of each pair. Writes ``OUT/results.json``, ``OUT/report.md`` and
``OUT/loss_curves.png``; prints a table to stderr and one JSON line last on stdout.

    python -m bench.throughput [--repeats 5] [--steps 20] [--warmup 2] [--interleave steps|runs]
        [--threads 1] [--batch-size 8] [--max-length 128] [--hidden 256] [--layers 4]
        [--heads 4] [--intermediate 512] [--lr 1e-3] [--seed 0] [--sparsity 0.9]
        [--calibration-steps 2] [--lora-r 16] [--lora-alpha 32] [--trl-fft-params targets|all]
        [--examples 512] [--prompt-fraction 0.75] [--data-dir ../shared/data] [--workdir DIR]
        [--out bench/results/throughput]

Modules: ``inputs`` (model, data, lota's reference batches), ``runs`` (the pairs, gated),
``gated`` (``lota adapt`` stopping at gates, a child), ``trl_run`` (one TRL run, a child),
``summary`` (statistics and checks), ``report`` (report.md and the loss curves).
"""
