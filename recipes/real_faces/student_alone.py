# Real data, student trained alone (no teacher): the gap every KD method
# should close. MobileFaceNet (width 0.35, 192-d, CosFace) on CelebA-299 at
# 112x112, tested on LFW and CFP-FF (_base_/real_faces.py).
_base_ = ['../_base_/real_faces.py']
model = dict(teachers=dict(teacher_fr=None), teacher_cache=None)
