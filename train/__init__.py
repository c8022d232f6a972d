"""Training for fcnzoo: offline data, the loop, checkpoints and the out-of-memory playbook.

    from train import data, config, loop
    data.prepare("mnist")                                  # once, offline (`zoo data prepare mnist`)
    images, labels = data.load_arrays("mnist", "train")    # uint8 (N, 28, 28, 1), int32 (N,)
    result = loop.train(config.TrainConfig(model="lenet5", dataset="mnist", epochs=2))

Modules are imported lazily by their users, so `import train` stays cheap.
"""
