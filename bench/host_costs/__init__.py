"""Host-side costs of ``lota adapt`` that a GPU run pays on the host: what the CPU measures of them.

Parts (``--parts``, default all), on a random Llama built in memory (``--hidden 768 --layers 8``,
intermediate 2048, byte vocabulary: about 57M parameters, all but the embeddings in the targets):

- ``syncs``: host synchronisations per sparse-phase step, counted (a CPU run has none, so the
  calls that are one on a GPU are counted instead): ``Tensor.item``, ``tolist``, ``bool``/``int``/
  ``float`` of a tensor, ``nonzero``, ``repeat_interleave`` without ``output_size``, ``cpu()`` and
  ``GradScaler.get_scale``, each keyed by the calling module (``torch.optim``'s ``item`` calls
  read its step counters, which stay on the host in a GPU run: they are no sync). Per step, after a first warm-up step, for four settings: plain,
  ``grad_accum`` 4, float16 compute with its loss scaler (grad_accum 4), and the weights marked
  sharded (the FSDP2 path, in one process). A smaller model (``--syncs-hidden``) is enough: the
  counts depend on the number of targets and micro-batches, not on their size;
- ``checkpoint``: every checkpoint write of a ``lota adapt`` run (lota with its adamw calibration,
  fft) with ``--checkpoint-every 0``: phase, step, bytes of the files written, seconds (from the
  run's ``checkpoint_start`` and ``checkpoint_saved`` events, ``lota.events``);
- ``rss``: the whole-run peak resident set of ``lota adapt`` for fft, lora and lota (each in its own
  process, from ``wait4``), and its ratio to fft's;
- ``selection``: seconds of the exact top-k selection (``magnitude``, sparsity 0.9) over the
  targets' random task vector; ``fingerprint``: seconds of one fingerprint of the model, and how
  many tensors a ``lota adapt`` run hashes in all (its ``weight_hashed`` events; each weight once is
  the least);
- ``gpu_check``: ``bench/gpu_check.py``'s own estimate of its default set on one H100, per part.

Timings on a shared CPU are noisy; counts and bytes are exact. Prints one JSON line per part as it
goes, then one JSON line with them all last.

    python -m bench.host_costs [--parts syncs,checkpoint,rss,selection,fingerprint,gpu_check]
"""
