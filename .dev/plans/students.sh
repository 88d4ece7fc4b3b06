# Session 19: source_h200's main job, then two student_size runs of 1× students only
# (2 seeds): the data source at the main job's distillation budget (500 steps of 5 × 64
# sequences at lr 5e-4: train against held_out), then train at 1,000 steps and 5e-4,
# which with session 18's 1,000 steps at 6e-4 separates the steps from the rate.
python3 launch/main.py --config=launch/configs/source_h200.py --workdir=/tmp/rg/src
python3 launch/experiment.py --experiment=student_size --config=launch/configs/source_h200.py --workdir=/tmp/rg/src --config.experiment_seeds=2 --setting="sources=('train','held_out')" --setting="sizes=(1,)" --setting=per_domain=64 --setting=steps=500 --setting=lr=5e-4
mkdir -p /tmp/rg/src_sources/experiments && mv /tmp/rg/src/experiments/student_size.* /tmp/rg/src_sources/experiments/
python3 launch/experiment.py --experiment=student_size --config=launch/configs/source_h200.py --workdir=/tmp/rg/src --config.experiment_seeds=2 --setting="sources=('train',)" --setting="sizes=(1,)" --setting=per_domain=64 --setting=steps=1000 --setting=lr=5e-4
mkdir -p /tmp/rg/src_steps/experiments && mv /tmp/rg/src/experiments/student_size.* /tmp/rg/src_steps/experiments/
