"""GRPO: the stage (``stage``), its rollouts over the engine pool (``rollouts``), the policy loss and advantage
estimators (``loss``) and the learner batch layouts (``pack``)."""
