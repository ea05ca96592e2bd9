"""Training memory and step time against full fine-tuning, the official LoTA approach and PEFT
LoRA, on a Llama config of about 200M parameters (batch 1, short sequences, AdamW for lota and
FFT). Three parts (``--parts``):

``sparse`` (the default): the sparse phase alone, fp32. Each method runs in its own process,
interleaved over ``--repeats`` rounds:
- ``lota``: ``lota adapt MODEL --ticket T`` (the sparse phase alone, sparsity 0.9);
- ``fft``: ``lota adapt MODEL --method fft`` (dense training of the same target weights);
- ``official``: dense parameters with dense gradients masked to the ticket and a dense RMSprop
  state, as in the official LoTA code (its training script, reimplemented in ``official.py``);
- ``lora``: ``lota adapt MODEL --method lora --lora-r 16`` (PEFT, every linear layer in the blocks).
Memory is the peak resident set of the training phase (the kernel's high-water mark, reset once
the model is loaded), so loading the model is not counted for any method. Step time is the median
over steps after the first.

``pipeline``: the whole ``lota adapt`` run, calibration included, for each ``--calibration``
(adamw, sgd, fisher with fp32 and bf16 sums, lora) against FFT and LoRA, with fp32 and with bf16
weights (a bf16 copy of the model, loaded with ``--dtype bfloat16``). On bf16 weights the methods
with a dense phase (``fft``, ``lota-adamw``, ``lota-sgd``) run with lota's default float32 master
copies of the targets and, as the rows ``NAME:masters-none``, once more with ``--master-weights
none`` (pure bf16 training; ``--no-masters-none`` leaves those rows out); the other methods hold
no master copies, so the setting does not change them. ``lota adapt`` runs in
process in a child (``segments.py``) that follows the run's ``lota.events``: the mark starts once
the model is loaded (its weights read, so that pages mapped from the file are resident), and at
each phase start, just before lota restarts the high-water mark, the peak of the segment that
ends there is recorded, so the whole run's peak is the largest segment peak. Segments are grouped into before the training phase
(calibration and ticket selection; for FFT and LoRA only the setup), the training phase, and
after it (delta extraction, the frozen check, the outputs). Per phase, the bytes above the loaded
model per target parameter; the time of each run relative to the adamw calibration in the same
repeat; and a projection of those bytes onto Llama-3.1-8B's shapes on one GPU (computed, not
measured; activations are an assumption, ``--activations-gib``). Each run is also appended to
``WORKDIR/pipeline_runs.jsonl``; ``--from-runs`` reports such a file without running. Ratios and
time ratios pair the runs of the same repeat.

``checkpointing``: the same whole-run measurement with and without ``--gradient-checkpointing``
for ``--gc-methods`` (default fft, lora, lota-adamw, lota-sgd), fp32 and bf16 weights (bf16 with
the default float32 masters), at a batch where activations matter: ``--gc-batch-size`` examples
of ``--gc-max-length`` tokens each (every example fills its sequence, so no batch is padded),
``--gc-calibration-steps`` and ``--gc-steps`` steps. A model with fewer positions than
``--gc-max-length`` is given a copy whose config has that many (rotary positions: the weights are
the same). Each pair (with, without) runs back to back, its order alternating between repeats.
Reported per phase: the peak without and with checkpointing, their ratio and difference (the
activation memory that checkpointing saves), and the time with over without, for the whole run
and for the training steps alone (their ``step_s`` in ``metrics.jsonl``, which leaves out
checkpoint writes and delta extraction). Each run is appended to
``WORKDIR/checkpointing_runs.jsonl``; ``--checkpointing-from-runs`` reports such a file.

Prints tables to stderr and one JSON line last on stdout.

    python -m bench.memory [--layers 14] [--hidden 1024] [--steps 6] [--repeats 2]
    python -m bench.memory --parts pipeline --calibration-steps 2 --steps 3 --repeats 2
    python -m bench.memory --parts checkpointing --gc-batch-size 4 --gc-max-length 128
"""
