"""3D Slicer module: MedSAM Agent.

Thin Slicer glue over the engine in MedSAMAgentLib (which never imports slicer).
This first version registers the module; the Auto-segment panel, live markups and
the worker connection come with the Slicer module issue.
"""
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget


class MedSAMAgent(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSAM Agent"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSAM Agent developers"]
        self.parent.helpText = (
            "Agentic segmentation: a vision-language policy places boxes and clicks, a SAM2-family model "
            "updates the mask, slice by slice.")
        self.parent.acknowledgementText = "Built on SAM2 (Meta), MedSAM2 and Qwen3-VL."


class MedSAMAgentWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
