// SPDX-License-Identifier: GPL-2.0
/*
 * edu_uio - a UIO driver for QEMU's "edu" test device (1234:11e8) that runs it on MSI.
 *
 * uio_pci_generic can only deliver INTx, and vfio-pci needs an IOMMU in the guest (Debian's
 * kernels lack CONFIG_VFIO_NOIOMMU). This driver allocates edu's single MSI vector and lets UIO
 * count it, so edutest (guests/workloads) can account MSIs exactly with no IOMMU in L2.
 *
 * The handler does nothing to the device: MSI is edge-triggered, edu sends one message per raise
 * whether or not its irq status was acked, and edutest reads and acks that status itself, which it
 * must see to tell raise-IRQ from DMA-done interrupts.
 *
 * Suspend quiesces like a real driver: it waits for a DMA that user space started before it was
 * frozen. Without that, the transfer can finish while the guest sleeps: QEMU's wake-up resets the
 * CPUs, so its completion MSI is lost, and the PCI core may already have turned bus mastering off,
 * so its data is lost too. Both would be blamed on the restart around the suspend.
 */
#include <linux/interrupt.h>
#include <linux/iopoll.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/uio_driver.h>

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8
#define EDU_DMA_CMD 0x98
#define EDU_DMA_RUN 0x1
#define EDU_DMA_WAIT_US 2000000 /* edu runs a DMA 100 ms (virtual) after it is started */

struct edu_uio {
	struct uio_info info;
	void __iomem *bar;
};

static irqreturn_t edu_uio_handler(int irq, struct uio_info *info)
{
	return IRQ_HANDLED; /* uio_interrupt() counts the event and wakes readers */
}

static int edu_uio_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct edu_uio *edu;
	struct uio_info *info;
	int ret;

	edu = devm_kzalloc(&pdev->dev, sizeof(*edu), GFP_KERNEL);
	if (!edu)
		return -ENOMEM;
	info = &edu->info;
	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	edu->bar = pcim_iomap(pdev, 0, 0);
	if (!edu->bar)
		return -ENOMEM;
	ret = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSI);
	if (ret < 0) {
		dev_err(&pdev->dev, "edu_uio: no MSI vector: %d\n", ret);
		return ret;
	}
	info->name = "edu_uio";
	info->version = "1";
	info->irq = pci_irq_vector(pdev, 0);
	info->irq_flags = 0;
	info->handler = edu_uio_handler;
	info->mem[0].name = "bar0";
	info->mem[0].addr = pci_resource_start(pdev, 0);
	info->mem[0].size = pci_resource_len(pdev, 0);
	info->mem[0].memtype = UIO_MEM_PHYS;
	ret = uio_register_device(&pdev->dev, info);
	if (ret) {
		pci_free_irq_vectors(pdev);
		return ret;
	}
	pci_set_drvdata(pdev, edu);
	dev_info(&pdev->dev, "edu_uio: MSI on irq %ld\n", info->irq);
	return 0;
}

static void edu_uio_remove(struct pci_dev *pdev)
{
	struct edu_uio *edu = pci_get_drvdata(pdev);

	uio_unregister_device(&edu->info);
	pci_free_irq_vectors(pdev);
}

/* The harness reads these lines from the guest's log: "was a transfer in flight at suspend?" */
static int edu_uio_suspend(struct device *dev)
{
	struct edu_uio *edu = dev_get_drvdata(dev);
	ktime_t start = ktime_get();
	u32 cmd = readl(edu->bar + EDU_DMA_CMD);

	if (!(cmd & EDU_DMA_RUN))
		return 0;
	if (readl_poll_timeout(edu->bar + EDU_DMA_CMD, cmd, !(cmd & EDU_DMA_RUN), 1000, EDU_DMA_WAIT_US))
		dev_warn(dev, "edu_uio: DMA still running at suspend (cmd 0x%x)\n", cmd);
	else
		dev_info(dev, "edu_uio: DMA in flight at suspend; waited %lld us for it\n",
			 ktime_us_delta(ktime_get(), start));
	return 0;
}

static DEFINE_SIMPLE_DEV_PM_OPS(edu_uio_pm, edu_uio_suspend, NULL);

static const struct pci_device_id edu_uio_ids[] = {
	{ PCI_DEVICE(EDU_VENDOR, EDU_DEVICE) },
	{ }
};
MODULE_DEVICE_TABLE(pci, edu_uio_ids);

static struct pci_driver edu_uio_driver = {
	.name = "edu_uio",
	.id_table = edu_uio_ids,
	.probe = edu_uio_probe,
	.remove = edu_uio_remove,
	.driver.pm = pm_sleep_ptr(&edu_uio_pm),
};
module_pci_driver(edu_uio_driver);

MODULE_DESCRIPTION("UIO driver with MSI for QEMU's edu test device");
MODULE_LICENSE("GPL");
