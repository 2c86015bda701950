"""Search a training stage's hyperparameters with Ray Tune.

    python jobs/tune.py                                   # small ASHA study of the debug pretrain model
    python jobs/tune.py --config configs/tune/debug.yaml search.num_samples=8
"""

from r1ray.cli import main
from r1ray.tune.config import TuneConfig as CONFIG


def run(cfg: CONFIG):
    from r1ray.pipeline.upstream import inputs_for
    from r1ray.tune.study import run as run_study
    from r1ray.tune.study import summary

    result = run_study(cfg, prepare_inputs=inputs_for)
    print(summary(result, cfg))
    return result


if __name__ == "__main__":
    main(CONFIG, run)
