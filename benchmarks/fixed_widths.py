"""How accurate can a reference CNN of given widths get at this size?

Trains Conv(c1)-BN-ReLU-Pool, Conv(c2)-BN-ReLU-Pool, Dense(d)-Dropout, Dense(10)
for the protocol's 15 epochs (Adam 1e-3, batch 128, seed 0) on a benchmark work
directory's data.npz; with `kd`, as a keras.distillation.Distiller student of
that directory's dense.keras (LogitsDistillation T=4, student_loss_weight 0.5),
as the benchmark's kd system does. Prints widths, parameters, test accuracy.

    python benchmarks/fixed_widths.py 16/32/32,32/48/16 kd [WORK]

With `export` instead of `kd`/`none`, trains nothing: writes each width's
untrained network to WORK/w<c1>-<c2>-<d>.tflite with `export_tflite`, to be
timed by `one_pass.py` (the time does not depend on the weights). A c2 of 0
leaves the second convolution out.

    python benchmarks/fixed_widths.py 8/16/48,4/8/96,8/0/48 export WORK
"""
import os, sys, time; os.environ["TF_CPP_MIN_LOG_LEVEL"]="3"
import numpy as np, keras
WORK=sys.argv[3] if len(sys.argv)>3 else os.path.join(os.path.dirname(__file__), "work", "2026-11-28")
d=np.load(os.path.join(WORK, "data.npz"))
f=lambda a: a.astype("float32")[...,None]/255. if a.ndim==3 else a.astype("float32")/255.
x,y,xv,yv,xt,yt=f(d["x_train"]),d["y_train"],f(d["x_val"]),d["y_val"],f(d["x_test"]),d["y_test"]
teacher = keras.models.load_model(os.path.join(WORK, "reference_cnn", "dense.keras")) if "kd" in sys.argv[2:3] else None
def build(c1,c2,dn):
    i=keras.Input((28,28,1)); h=keras.layers.Conv2D(c1,3,padding="same",use_bias=False)(i)
    h=keras.layers.BatchNormalization()(h); h=keras.layers.ReLU()(h); h=keras.layers.MaxPooling2D(2)(h)
    if c2:
        h=keras.layers.Conv2D(c2,3,padding="same",use_bias=False)(h); h=keras.layers.BatchNormalization()(h); h=keras.layers.ReLU()(h); h=keras.layers.MaxPooling2D(2)(h)
    h=keras.layers.Flatten()(h); h=keras.layers.Dense(dn,activation="relu")(h); h=keras.layers.Dropout(0.3)(h)
    return keras.Model(i, keras.layers.Dense(10)(h))
for spec in sys.argv[1].split(","):
    c1,c2,dn=map(int,spec.split("/"))
    keras.utils.set_random_seed(0)
    m=build(c1,c2,dn)
    if sys.argv[2]=="export":
        import dkdp_keras
        dkdp_keras.export_tflite(m, os.path.join(WORK, "w%d-%d-%d.tflite"%(c1,c2,dn)), check_data=xt[:64], latency_runs=1)
        continue
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if teacher is not None:
        from keras.distillation import Distiller, LogitsDistillation
        dm=Distiller(teacher=teacher, student=m, distillation_losses=LogitsDistillation(temperature=4.0), student_loss_weight=0.5)
        dm.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    else:
        dm=m; dm.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    t=time.time()
    es=keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=100, restore_best_weights=True, mode="max")
    dm.fit(x,y,batch_size=128,epochs=15,validation_data=(xv,yv),verbose=0,callbacks=[es])
    m.compile(loss=loss, metrics=["accuracy"])
    acc=m.evaluate(xt,yt,verbose=0)[1]
    print(spec, m.count_params(), "test %.4f"%acc, "%.0fs"%(time.time()-t), flush=True)
