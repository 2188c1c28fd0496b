"""The GAN learns: a short seeded CPU run's samples end up about as close to the data as the data is
to itself (the realism ratio of utils.neighbours), far closer than an untrained generator's."""
import json

from xrayforge.demo import gan_config
from xrayforge.train.trainer import Trainer


def test_a_short_run_learns_the_phantoms(learned_gan, tmp_path):
    archive, run = learned_gan
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    last = log[-1]
    assert last["resolution"] == 16 and last["alpha"] == 1.0
    # the median of the last three ticks: one tick's G_ema can sit on a bump of the GAN's dynamics
    recent = sorted(r["realism"] for r in log[-3:])[1]
    untrained = Trainer(gan_config(archive, tmp_path / "fresh", resolution=16, phase_images=2000, device="cpu"),
                        progress=False).measure_realism(level=2, alpha=1.0)
    assert untrained["realism"] > 5
    assert recent < 2.0 and recent < untrained["realism"] / 4
    assert last["diversity"] > 0.5  # not one image for every latent
