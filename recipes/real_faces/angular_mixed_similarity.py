# Real data, both teachers mixed at the level of pairwise similarities:
# angular KD to the sirius teacher (angular_kd_no_id.py) plus a term that
# pulls the student's cosine-similarity matrix within each batch towards
# the mean of the two teachers' matrices (SPLoss, mode 'tface', with the
# faceplugin teacher as its second teacher: kdzoo's two-teacher extension
# of similarity-preserving KD). No projector: the two teachers' 192-d and
# 512-d spaces never meet, only their similarities are averaged. The mix is
# the one the real-faces page measured on CelebA-299's own pairs (the two
# teachers' scores averaged gave the highest TAR@FAR=1e-3 point estimate,
# 0.902 against 0.895 and 0.880, no interval); this asks
# whether a student can follow it. Both embeddings are cached (image and
# mirror); no identity loss. Weight 100: the choice of the 3-point search
# in recipes/suites/real_faces_ablations.py (100, 1000, 10000; 1000 not
# distinguishable from it on the validation split, 10000 worse).
_base_ = ['./angular_kd_no_id.py']
model = dict(
    teachers=dict(
        teacher_fr2=dict(type='OnnxTeacher',
                         file='../shared/teachers/faceplugin_fr_feature.onnx',
                         input_size=(112, 112))),
    teacher_cache=dict(teachers=['teacher_fr', 'teacher_fr2']),
    distill_losses=dict(
        loss_mix=dict(
            type='SPLoss', mode='tface', teacher_weights=(0.5, 0.5),
            loss_weight=100.0,
            inputs=dict(s_feat='student.embedding',
                        t_feat='teacher_fr.embedding',
                        t_feat2='teacher_fr2.embedding'))))
