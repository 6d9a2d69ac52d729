-- The deployer compares the arms of a rollout by the trajectories each ran under one deployment.
CREATE INDEX trajectories_deployment ON trajectories (deployment_id, model_version, status)
    WHERE deployment_id IS NOT NULL;
