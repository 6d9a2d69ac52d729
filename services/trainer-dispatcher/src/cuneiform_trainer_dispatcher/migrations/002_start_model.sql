-- What each batch trains from, fixed at its first offer so that every attempt starts from the same model:
-- the champion the routing table named then (its artifact), or the configured base model.
ALTER TABLE batches ADD COLUMN base_model text;
ALTER TABLE batches ADD COLUMN base_artifact jsonb;
