# The CPU demo's networks (input 32x32): a heavier IResNet teacher and a
# MobileFaceNet student ~10x smaller. Margin head: CosFace (s=32, m=0.35)
# trains reliably from scratch on small data.
teacher_backbone = dict(type='IResNet', width_mult=0.25, layers=(1, 2, 2, 1),
                        embedding_size=128, input_size=(32, 32))
student_backbone = dict(type='MobileFaceNet', width_mult=0.125,
                        blocks=(1, 1, 1, 1), embedding_size=64,
                        input_size=(32, 32))
