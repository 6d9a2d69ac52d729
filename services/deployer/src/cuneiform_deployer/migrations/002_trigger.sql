-- What started the training that produced a version: readiness's rules, or who forced the batch and why.
ALTER TABLE models ADD COLUMN triggered_by text;
ALTER TABLE models ADD COLUMN trigger_reason text;
