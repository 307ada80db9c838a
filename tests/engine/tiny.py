"""A tiny synthetic training configuration shared by the engine and CLI tests."""

from ddetr.data import synthetic
from ddetr.engine.config import make_config

TINY_DATA = dict(synthetic_train=16, synthetic_val=4, synthetic_size=64, seed=5)
TINY_RUN = dict(base_size=64, max_size=96, d_model=64, num_heads=4, num_queries=10,
                dim_feedforward=64, enc_layers=1, dec_layers=2, enc_n_points=2, dec_n_points=2,
                batch_size=4, num_workers=0, progress=False, threads=1)


def tiny_config(tmp_path, **overrides):
    cache = tmp_path / "cache"
    return make_config({**TINY_DATA, **TINY_RUN, "cache_dir": str(cache),
                        "output_dir": str(tmp_path / "out"), **overrides})


def make_data(root) -> None:
    cfg = synthetic.SyntheticConfig(seed=TINY_DATA["seed"], num_train=TINY_DATA["synthetic_train"],
                                    num_val=TINY_DATA["synthetic_val"],
                                    image_size=TINY_DATA["synthetic_size"])
    synthetic.ensure_dataset(str(root), cfg, progress=False)


def cli_flags(tmp_path) -> list[str]:
    flags = []
    for key, value in {**TINY_DATA, **TINY_RUN}.items():
        if isinstance(value, bool):
            flags.append(f"--{'' if value else 'no-'}{key}")
        else:
            flags += [f"--{key}", str(value)]
    return flags + ["--cache_dir", str(tmp_path / "cache")]
