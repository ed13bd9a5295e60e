# Real data, angular KD alone: angular_kd.py without the identity loss
# (model.cls_loss_weight=0, so the CosFace head is not trained). On 6k
# images of 299 identities a margin-softmax head overfits a small student;
# mimicking a strong teacher's embedding is the whole training signal here.
_base_ = ['./angular_kd.py']
# Weight 64: the best of the search over 4, 16, 64, 256 in
# recipes/suites/real_faces.py's grid.
model = dict(cls_loss_weight=0.0,
             distill_losses=dict(loss_ang=dict(loss_weight=64.0)))
