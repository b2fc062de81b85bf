"""The training engine: the loop (trainer), one optimizer step (step), the loss surface every head
offers (objective), what feeds it (feeder), clean stops (stopping), what the run records (runlog),
processes (distributed), resumable state (checkpoint) and the learning-rate schedule. Imports
config, the parts and utils/."""
