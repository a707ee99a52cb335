"""One client's training: its settings (`config`), its trainer chosen by name (`registry`, one file per
trainer), DP-SGD for any of them (`dp_sgd`), its batch layout (`batching`), the round boundary
(`callback`) and the round itself (`run`)."""
