# Model 3's full run (PROTOCOL.md version 2), one system or budget at a time,
# each measured into the committed ledger as it ends. Run from benchmarks/:
#     nohup sh model3.sh > work/logs/model3.log 2>&1 &
# A command whose rows are in the ledger is skipped; one interrupted resumes
# from its last epoch where WORK is still there. kd distils from dense or
# dense+avg (the better on validation): until kd's rows are in the ledger,
# both are trained into WORK where they are not there (on a new machine),
# without measuring them again.
mkdir -p work/logs
R="python run.py --train-only --work work/v2 --models mobilenet_v2 --ledger results/model3-ledger.jsonl"
set -x
$R --systems dense
$R --systems dense_avg
grep -q '"system": "kd"' results/model3-ledger.jsonl || python run.py --train-only \
    --work work/v2 --models mobilenet_v2 --systems dense dense_avg
$R --systems kd
$R --systems dkdp --targets --structured macs:0.5
$R --systems dkdp --targets --structured macs:0.3
$R --systems dkdp --targets --structured macs:0.2
$R --systems tfmot
$R --systems tfmot_xnnpack
$R --systems dkdp --targets 0.5 --structured
$R --systems dkdp --targets 0.8 --structured
$R --systems dkdp --targets 0.9 --structured
# Then model 3's training cost (PROTOCOL.md version 2): dense and each system
# alternating, one process each, on the machine the queue leaves idle. Three
# epochs a run: a 15-epoch pair is over an hour here. Each pair is written as
# it ends, and a run of the same command goes on from the file.
P="python paired_times.py --model mobilenet_v2 --target 0.9 --pairs 3 --epochs 3"
$P --out results/model3-paired-mobilenet_v2-dkdp-0.9.json
$P --system tfmot --out results/model3-paired-mobilenet_v2-tfmot-0.9.json
# The report of every row, check and cost, as results/<date>.md (it measures
# nothing: every row is in the ledger; the costs are every *-paired-* file).
python run.py --measure-only --work work/v2 --models mobilenet_v2 \
    --ledger results/model3-ledger.jsonl --results results
