"""Using a trained model: embeddings, facebanks, identification, verification, video and export
(behind infer.py). Imports the parts and utils/."""
