# Real data, angular KD alone: angular_kd.py without the identity loss
# (model.cls_loss_weight=0, so the CosFace head is not trained). On 6k
# images of 299 identities a margin-softmax head overfits a small student;
# mimicking a strong teacher's embedding is the whole training signal here.
_base_ = ['./angular_kd.py']
model = dict(cls_loss_weight=0.0)
