"""The README's table of the digits metric on real and deliberately degraded digits.

    python scripts/digits_metric_table.py [--seed=0]

Scores the held-out half of sklearn's digits (real), and the same digits blurred, collapsed
to their class means, replaced by noise, and with a stray stroke
(``digits_classifier.degraded_digits``), each as a sample set of 899 images, and prints a
Markdown table of confident share, digit-FD and their parts.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from diffusion_jax import digits_classifier
from diffusion_jax.cli import flags

_SEED = flags.define_seed("Digits split / classifier / degradation seed.")


def main():
    metric = digits_classifier.DigitsMetric(seed=_SEED.value)
    reference = metric.reference(digits_classifier.DIGITS_SIZE)
    sets = {"real held-out digits": reference["heldout_vs_train"]}
    for name, images in digits_classifier.degraded_digits(metric, seed=_SEED.value).items():
        sets[name] = metric(images)
    print(f"classifier test accuracy {reference['classifier_test_accuracy']:.3f}, "
          f"temperature {reference['temperature']:.3f}\n")
    print("| sample set | confident share | digit-FD | classifier-confident | typical |")
    print("| --- | --- | --- | --- | --- |")
    for name, s in sets.items():
        print(f"| {name} | {s['confidence_share']:.3f} | {s['digit_fd']:.2f} | "
              f"{s['classifier_confidence_share']:.3f} | {s['typical_share']:.3f} |")


if __name__ == "__main__":
    flags.run(main, prog="digits_metric_table.py")
