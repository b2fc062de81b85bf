"""Using a trained model: embeddings, facebanks, identification, verification, video and export
(behind infer.py). Imports evaluation/ (its embedding modes and eval.json), the parts and utils/."""
