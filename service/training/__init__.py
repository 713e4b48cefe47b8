"""The learning loop: correction rules, the annotation queue, exports, retraining jobs and the trainer process; may use serving, store and the shared modules."""
