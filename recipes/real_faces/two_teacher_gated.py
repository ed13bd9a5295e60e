# Real data, both teachers mixed per sample: final angular terms to the
# sirius teacher (192-d, the student's embedding directly) and to the
# faceplugin teacher (512-d, through a Linear+BN projector 192 -> 512),
# weighted per image by a small gate on the two teachers' embeddings
# (TeacherAttentionAngularLoss: kdzoo's alternative reading of LIAAD,
# reconstructed, see docs/liaad.md). Beside two_teacher_angular.py, which
# sums the same two terms with fixed weights, it asks whether letting each
# image lean on the teacher it can follow helps. Both embeddings cached,
# no identity loss. The loss is a weighted mean of the two terms, so its
# weight compares with the sum of two_teacher_angular's (128 + 128). Weight
# 1024: the choice of the 3-point search in
# recipes/suites/real_faces_ablations.py (64, 256, 1024; the three not
# distinguishable from one another on the validation split).
_base_ = ['./two_teacher_angular.py']  # teachers, cache, projector
model = dict(
    distill_losses=dict(
        _delete_=True,
        loss_gate=dict(
            type='TeacherAttentionAngularLoss', p=2, tau=1.0, alpha_min=0.1,
            beta=0.1, loss_weight=1024.0,
            inputs=dict(s_emb_1='student.embedding',
                        t_emb_1='teacher_fr.embedding',
                        s_emb_2=dict(tap='student.embedding',
                                     connector='proj_fr2'),
                        t_emb_2='teacher_fr2.embedding'))))
