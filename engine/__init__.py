"""The training engine: the loop (trainer), what feeds it (feeder), processes (distributed),
resumable state (checkpoint) and the learning-rate schedule. Imports the parts and utils/."""
