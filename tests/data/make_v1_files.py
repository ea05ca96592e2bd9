"""Write ticket_v1.safetensors and delta_v1.safetensors, the format-v1 fixtures of test_container.py.

Run once from anywhere: ``python tests/data/make_v1_files.py``. The files are checked in and must
never be regenerated once released: test_container.py asserts that lota still reads them exactly.
The content is deterministic; the byte order of the metadata keys is not (safetensors writes its
metadata from a hash map), so a rerun may give different bytes with the same content.
"""

from pathlib import Path

import torch

from lota.delta import SparseDelta
from lota.format import save
from lota.ticket import Ticket

HERE = Path(__file__).resolve().parent
FINGERPRINT = "blake2b:00112233445566778899aabbccddeeff"

SHAPES = {
    "model.layers.0.mlp.up_proj.weight": (8, 16),  # gaps, uint8
    "model.layers.0.self_attn.q_proj.weight": (4, 4),  # bitmask
    "model.layers.0.self_attn.k_proj.weight": (3, 2),  # empty
    "model.layers.0.self_attn.v_proj.weight": (2, 2),  # full
    "model.layers.1.mlp.down_proj.weight": (400, 250),  # gaps, uint16
    "model.layers.1.mlp.gate_proj.weight": (400, 250),  # gaps, uint32
}
INDICES = {
    "model.layers.0.mlp.up_proj.weight": [1, 5, 6, 100],
    "model.layers.0.self_attn.q_proj.weight": [0, 2, 3, 5, 8, 9, 12, 15],
    "model.layers.0.self_attn.k_proj.weight": [],
    "model.layers.0.self_attn.v_proj.weight": [0, 1, 2, 3],
    "model.layers.1.mlp.down_proj.weight": [7, 60007],
    "model.layers.1.mlp.gate_proj.weight": [2, 70000, 99999],
}
VALUES = {
    "model.layers.0.mlp.up_proj.weight": ([1.0, -1.0, 0.0078125, -3.5], torch.float32),
    "model.layers.0.self_attn.q_proj.weight": (
        [0.5, -0.25, 1.5, -2.0, 0.125, 3.0, -0.0, 65504.0],
        torch.float16,
    ),
    "model.layers.0.self_attn.k_proj.weight": ([], torch.float32),
    "model.layers.0.self_attn.v_proj.weight": ([0.25, 0.5, 0.75, 1.0], torch.float32),
    "model.layers.1.mlp.down_proj.weight": ([0.0078125, -256.0], torch.bfloat16),
    "model.layers.1.mlp.gate_proj.weight": ([2.0**-20, -1234.5, 1e30], torch.float32),
}


def main() -> None:
    ticket = Ticket(
        shapes=SHAPES,
        indices={n: torch.tensor(i, dtype=torch.long) for n, i in INDICES.items()},
        base_fingerprint=FINGERPRINT,
    )
    save(
        ticket,
        HERE / "ticket_v1.safetensors",
        config={"selector": "magnitude", "sparsity": "0.9", "seed": 0},
    )
    delta = SparseDelta(
        ticket=ticket, values={n: torch.tensor(v, dtype=dt) for n, (v, dt) in VALUES.items()}
    )
    save(delta, HERE / "delta_v1.safetensors", config={"lr": "0.0001", "steps": 10})


if __name__ == "__main__":
    main()
