"""Faces in raw photos: a detector (boxes, five landmarks, scores) and the similarity alignment to
the ArcFace 112x112 template. A part: imports utils/ only."""
