"""Published Long Range Arena results, the numbers our tables print beside ours.

Accuracy (test %): Tay et al. 2020, "Long Range Arena: A Benchmark for Efficient Transformers"
(ICLR 2021), Table 1; and Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact
Attention with IO-Awareness" (NeurIPS 2022), Table 3. Speed: LRA Table 2 (byte-level Text,
batch 32, steps/s on TPU v3, and the Transformer's peak memory per device). Every model failed
Path-X in the LRA paper, so it has no entry there; its average is over the other five tasks.

Keys are our variant names; ``LRA_NAMES`` gives the paper's row name. The LRA paper does not say
which Synthesizer it ran; we place its row beside ``synthesizer-dense``.
"""

from __future__ import annotations

LRA_SOURCE = "Tay et al. 2020, Long Range Arena, Table 1 (test accuracy %)"
FLASH_SOURCE = "Dao et al. 2022, FlashAttention, Table 3 (test accuracy %)"
SPEED_SOURCE = "Tay et al. 2020, Long Range Arena, Table 2 (Text, batch 32, TPU v3 steps/s)"

# The five tasks LRA averaged, and the order of our table's columns.
LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder32")

LRA_NAMES = {
    "full": "Transformer", "local": "Local Attention", "sparse-transformer": "Sparse Trans.",
    "longformer": "Longformer", "linformer": "Linformer", "reformer": "Reformer",
    "sinkhorn": "Sinkhorn Trans.", "synthesizer-dense": "Synthesizer", "bigbird": "BigBird",
    "linear": "Linear Trans.", "performer": "Performer",
}


def _row(listops: float, text: float, retrieval: float, image: float, pathfinder: float
         ) -> dict[str, float]:
    return dict(zip(LRA_TASKS, (listops, text, retrieval, image, pathfinder), strict=True))


LRA_ACCURACY: dict[str, dict[str, float]] = {
    "full": _row(36.37, 64.27, 57.46, 42.44, 71.40),
    "local": _row(15.82, 52.98, 53.39, 41.46, 66.63),
    "sparse-transformer": _row(17.07, 63.58, 59.59, 44.24, 71.71),
    "longformer": _row(35.63, 62.85, 56.89, 42.22, 69.71),
    "linformer": _row(35.70, 53.94, 52.27, 38.56, 76.34),
    "reformer": _row(37.27, 56.10, 53.40, 38.07, 68.50),
    "sinkhorn": _row(33.67, 61.20, 53.83, 41.23, 67.45),
    "synthesizer-dense": _row(36.99, 61.68, 54.67, 41.61, 69.45),
    "bigbird": _row(36.05, 64.02, 59.29, 40.83, 74.87),
    "linear": _row(16.13, 65.90, 53.09, 42.34, 75.30),
    "performer": _row(18.01, 65.40, 53.82, 42.77, 77.05),
}

# FlashAttention's own Transformer baseline sits beside ``full``; its FlashAttention row beside
# ``flash`` (both exact attention; Path-X: 61.4 for FlashAttention, the first above chance).
FLASH_ACCURACY: dict[str, dict[str, float]] = {
    "full": _row(36.0, 63.6, 81.6, 42.3, 72.7),
    "flash": {**_row(37.6, 63.9, 81.4, 43.5, 72.7), "pathx": 61.4},
}

# LRA Table 2: steps/s at sequence length 1K, 2K, 3K, 4K (None: not given in the table).
LRA_SPEED: dict[str, dict[int, float | None]] = {
    "full": {1024: 8.1, 2048: 4.9, 3072: 2.3, 4096: 1.4},
    "performer": {1024: 9.5, 2048: 9.4, 3072: 8.7, 4096: 8.0},
    "linear": {4096: 7.8}, "linformer": {4096: 7.7}, "local": {4096: 7.4},
    "sinkhorn": {4096: 5.3}, "bigbird": {4096: 1.5}, "reformer": {4096: 1.1},
}
LRA_TRANSFORMER_MEMORY_GB = {1024: 0.85, 2048: 2.65, 3072: 5.51, 4096: 9.48}


def published(variant: str, task: str) -> float | None:
    """The LRA paper's test accuracy (%) of ``variant`` on ``task`` (FlashAttention's for
    variants LRA did not run); None when neither paper has it."""
    for table in (LRA_ACCURACY, FLASH_ACCURACY):
        if task in table.get(variant, {}):
            return table[variant][task]
    return None
