"""kdzoo: composable knowledge distillation for face recognition."""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
version = {}
with open(os.path.join(here, 'kdzoo', 'version.py')) as f:
    exec(f.read(), version)

# Compatible ranges; constraints.txt pins the exact set the README installs.
install_requires = [
    'torch>=2.4,<=2.14.1',
    'torchvision>=0.19,<=0.29.1',
    'mmengine==0.10.7',
    'mmcv-lite>=2.0,<2.3',
    'numpy>=1.24',
    'pillow>=9',
    'timm>=1.0',
    'einops>=0.7',
    'rich>=13',
    'onnx>=1.16',
    'onnxruntime>=1.18',
    'onnx2torch>=1.5',
    'matplotlib>=3.7',
]

setup(
    name='kdzoo',
    version=version['__version__'],
    description='Composable knowledge distillation for face recognition '
    '(registry of backbones, teachers, margin heads and KD loss plugins; '
    'MMEngine runners; open-set evaluation).',
    long_description=open(os.path.join(here, 'README.md')).read()
    if os.path.exists(os.path.join(here, 'README.md')) else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['kdzoo', 'kdzoo.*']),
    python_requires='>=3.9',
    install_requires=install_requires,
    extras_require={'test': ['pytest>=7', 'tensorboard>=2.10',
                             'submitit>=1.5'],
                    'tensorboard': ['tensorboard>=2.10'],
                    'cluster': ['submitit>=1.5']},
    entry_points={'console_scripts': ['kdzoo=kdzoo.cli:main']},
    license='Apache-2.0',
)
